package storage

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path"
	"regexp"
	"sort"
	"time"

	"github.com/opencontainers/go-digest"
)

// TagRecord is what the cache knows of a tag: the manifest it pointed to and
// when the upstream last confirmed that.
type TagRecord struct {
	Digest      digest.Digest `json:"digest"`
	MediaType   string        `json:"mediaType"`
	Size        int64         `json:"size"`
	ConfirmedAt time.Time     `json:"confirmedAt"`
}

// GetTag returns the record of repo:tag, or ErrNotFound.
func (s *Store) GetTag(ctx context.Context, repo Repo, tag string) (TagRecord, error) {
	p, err := Path(TagPath{repo, tag})
	if err != nil {
		return TagRecord{}, err
	}
	raw, err := s.d.GetContent(ctx, p)
	if err != nil {
		return TagRecord{}, translate(err)
	}
	var rec TagRecord
	if err := json.Unmarshal(raw, &rec); err != nil || rec.Digest.Validate() != nil {
		return TagRecord{}, fmt.Errorf("%w: damaged tag record %s:%s", ErrNotFound, repo, tag)
	}
	return rec, nil
}

// PutTag records repo:tag → rec.
func (s *Store) PutTag(ctx context.Context, repo Repo, tag string, rec TagRecord) error {
	p, err := Path(TagPath{repo, tag})
	if err != nil {
		return err
	}
	raw, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return translate(s.putContent(ctx, p, raw))
}

// DeleteTag forgets repo:tag. Deleting an unknown tag is not an error.
func (s *Store) DeleteTag(ctx context.Context, repo Repo, tag string) error {
	p, err := Path(TagPath{repo, tag})
	if err != nil {
		return err
	}
	err = translate(s.d.Delete(ctx, p))
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	return err
}

// ListTags returns the cached tags of repo in lexical order, or ErrNotFound
// when the repository has none.
func (s *Store) ListTags(ctx context.Context, repo Repo) ([]string, error) {
	dir, err := Path(TagsPath{repo})
	if err != nil {
		return nil, err
	}
	entries, err := s.d.List(ctx, dir)
	if err != nil {
		return nil, translate(err)
	}
	tags := make([]string, 0, len(entries))
	for _, e := range entries {
		name := path.Base(e)
		if pendingPut.MatchString(name) { // a PutContent in progress
			continue
		}
		tags = append(tags, name)
	}
	sort.Strings(tags)
	return tags, nil
}

// pendingPut matches the temporary names putContent (and the filesystem
// driver's PutContent) writes before its rename ("<name>.<uuid>.tmp").
var pendingPut = regexp.MustCompile(`\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.tmp$`)

// TagList is a repository's complete tag list as the upstream last served
// it (all pages merged), and when.
type TagList struct {
	Tags        []string  `json:"tags"`
	Complete    bool      `json:"complete"` // false: cut at the page bound
	ConfirmedAt time.Time `json:"confirmedAt"`
}

// GetTagList returns repo's cached tag list, or ErrNotFound.
func (s *Store) GetTagList(ctx context.Context, repo Repo) (TagList, error) {
	p, err := Path(TagListPath{repo})
	if err != nil {
		return TagList{}, err
	}
	raw, err := s.d.GetContent(ctx, p)
	if err != nil {
		return TagList{}, translate(err)
	}
	var tl TagList
	if err := json.Unmarshal(raw, &tl); err != nil {
		return TagList{}, fmt.Errorf("%w: damaged tag list of %s", ErrNotFound, repo)
	}
	return tl, nil
}

// PutTagList records repo's tag list (replacing the previous one).
func (s *Store) PutTagList(ctx context.Context, repo Repo, tl TagList) error {
	p, err := Path(TagListPath{repo})
	if err != nil {
		return err
	}
	raw, err := json.Marshal(tl)
	if err != nil {
		return err
	}
	return translate(s.putContent(ctx, p, raw))
}
