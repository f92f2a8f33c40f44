package storage

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path"
	"strings"

	driver "github.com/distribution/distribution/v3/registry/storage/driver"
)

// layoutRecord is the content of LayoutPath.
type layoutRecord struct {
	Version int `json:"version"`
}

// ErrLayout wraps a cache this code must not use: its layout is newer than
// LayoutVersion, or its version record is unreadable.
var ErrLayout = errors.New("storage: cache layout")

// LayoutResult says what EnsureLayout found and did.
type LayoutResult struct {
	Found    int // layout version found (1: no version file)
	Migrated int // tag records and links moved to the current layout
}

// EnsureLayout makes the cache one of LayoutVersion before it is used, and
// returns what it found and did. A cache without a version record is of
// layout 1: its tag records and links, keyed by repository alone, were
// written for one upstream registry, and are moved under registry (the
// configured upstream's, as in Repo) — the only registry an old mirror
// served. The version record is written last, so an interrupted migration
// resumes at the next start; objects another process moved meanwhile are
// skipped (replicas sharing a bucket may start together). Blobs and
// manifests do not move. A cache of a newer layout, or with an unreadable
// version record, is refused with an error wrapping ErrLayout: never
// misread.
func (s *Store) EnsureLayout(ctx context.Context, registry string, log *slog.Logger) (LayoutResult, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	lp := mustPath(LayoutPath{})
	raw, err := s.d.GetContent(ctx, lp)
	switch {
	case err == nil:
		var rec layoutRecord
		if jerr := json.Unmarshal(raw, &rec); jerr != nil || rec.Version < 2 {
			return LayoutResult{}, fmt.Errorf("%w: %s is not a layout record (%q); move it away if the cache is of an older ngc-mirror", ErrLayout, lp, strings.TrimSpace(string(raw)))
		}
		if rec.Version > LayoutVersion {
			return LayoutResult{Found: rec.Version}, fmt.Errorf("%w: the cache is of layout %d, written by a newer ngc-mirror; this one reads layout %d (upgrade it, or use another data_dir or bucket prefix)", ErrLayout, rec.Version, LayoutVersion)
		}
		return LayoutResult{Found: rec.Version}, nil
	case !errors.As(err, new(driver.PathNotFoundError)):
		return LayoutResult{}, fmt.Errorf("storage: reading the layout record: %w", err)
	}
	res := LayoutResult{Found: 1}
	if !validRegistry(registry) {
		return res, fmt.Errorf("storage: invalid registry %q", registry)
	}
	n, err := s.migrateV1(ctx, registry)
	res.Migrated = n
	if err != nil {
		return res, fmt.Errorf("storage: migrating the cache to layout %d (%d records moved so far; the next start goes on): %w", LayoutVersion, n, err)
	}
	if n > 0 {
		log.Info("migrated the cache layout: tag records and links now keyed by registry", "from", 1, "to", LayoutVersion, "registry", registry, "records", n)
	}
	rec, _ := json.Marshal(layoutRecord{Version: LayoutVersion})
	if err := s.putContent(ctx, lp, append(rec, '\n')); err != nil {
		return res, fmt.Errorf("storage: writing the layout record: %w", translate(err))
	}
	return res, nil
}

// migrateV1 moves layout 1's /repositories/<name>/{_tags,_links,_taglist} to
// /registries/<registry>/<name>/... and removes what is left of
// /repositories.
func (s *Store) migrateV1(ctx context.Context, registry string) (int, error) {
	root := mustPath(v1RepositoriesPath{})
	var files []string
	err := s.d.Walk(ctx, root, func(fi driver.FileInfo) error {
		if !fi.IsDir() {
			files = append(files, fi.Path())
		}
		return nil
	})
	if errors.As(err, new(driver.PathNotFoundError)) {
		return 0, nil // a new cache, or one that never recorded a tag
	}
	if err != nil {
		return 0, err
	}
	moved := 0
	for _, f := range files {
		if err := ctx.Err(); err != nil {
			return moved, err
		}
		rel := strings.TrimPrefix(f, root+"/")
		if pendingPut.MatchString(f) || (!strings.Contains(rel, "/_tags/") && !strings.Contains(rel, "/_links/") && !strings.HasSuffix(rel, "/_taglist")) {
			continue // a PutContent cut off, or not the layout's: left behind, removed below
		}
		dst := path.Join(mustPath(RegistriesPath{}), registryElement(registry), rel)
		if err := s.d.Move(ctx, f, dst); err != nil {
			if errors.As(err, new(driver.PathNotFoundError)) {
				continue // moved by another replica
			}
			return moved, fmt.Errorf("moving %s: %w", f, err)
		}
		moved++
	}
	if err := s.d.Delete(ctx, root); err != nil && !errors.As(err, new(driver.PathNotFoundError)) {
		return moved, fmt.Errorf("removing %s: %w", root, err)
	}
	return moved, nil
}
