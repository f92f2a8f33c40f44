package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"

	"github.com/ngc-mirror/ngc-mirror/internal/admin"
	"github.com/ngc-mirror/ngc-mirror/internal/ocierr"
	"github.com/ngc-mirror/ngc-mirror/internal/state"
)

// adminClient talks to a running mirror's admin API.
type adminClient struct {
	base  string
	token string
	hc    *http.Client
	poll  time.Duration // between polls of a followed job (0: 500 ms)
}

// stringList is a repeatable flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// newAdminClient reads --config / MIRROR_* like serve does, to find the
// mirror's address and token; --server and --token override.
func newAdminClient(cfgPath, server, token string) (*adminClient, error) {
	cfg, err := loadConfig(cfgPath)
	if err != nil {
		return nil, err
	}
	tr := &http.Transport{}
	if server == "" {
		if server, tr, err = localBase(cfg); err != nil {
			return nil, err
		}
	}
	if token == "" {
		token = cfg.Admin.Token
	}
	if token == "" {
		if token = readAdminToken(cfg.Storage.DataDir); token == "" {
			return nil, noTokenError(cfg.Storage.DataDir)
		}
	}
	return &adminClient{base: strings.TrimSuffix(server, "/"), token: token, hc: &http.Client{Timeout: 2 * time.Minute, Transport: tr}}, nil
}

// apiError is an admin API error answer: its status and envelope. OCI
// reports whether the body was an OCI error envelope; otherwise (a proxy's
// page) the envelope's code is HTTP_<status> and its message the body.
type apiError struct {
	Status int
	OCI    bool
	ocierr.Envelope
}

// answerText is an error answer as the CLI tells it: the status, and the
// OCI error's code and message when the body was one ("503
// (UNAVAILABLE: ...)"); another body (an HTML page) is left out.
func answerText(ae *apiError) string {
	if !ae.OCI {
		return strconv.Itoa(ae.Status)
	}
	return strconv.Itoa(ae.Status) + " (" + ae.Error() + ")"
}

func (c *adminClient) do(method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, c.base+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("mirror at %s: %w", c.base, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 32<<20))
	if resp.StatusCode >= 300 {
		if env, ok := ocierr.Decode(raw); ok {
			return &apiError{Status: resp.StatusCode, OCI: true, Envelope: env}
		}
		return &apiError{Status: resp.StatusCode, Envelope: ocierr.New("HTTP_"+fmt.Sprint(resp.StatusCode), strings.TrimSpace(string(raw)))}
	}
	return json.Unmarshal(raw, out)
}

// exitCode is 2 for a refused request (bad input), 1 otherwise.
func exitCode(err error) int {
	var ae *apiError
	if errors.As(err, &ae) && ae.Status >= 400 && ae.Status < 500 && ae.Status != 401 {
		return 2
	}
	return 1
}

// prefetchCmd: mirror prefetch IMAGE [--platform P]... [--detach]
// enqueues a prefetch on the running mirror and follows it with a progress
// bar (bytes, rate, ETA, current layer) until it ends. Exit 0 when done, 1
// when it failed, 2 for bad input (and see followHelp).
func prefetchCmd(args []string) int {
	fs := flag.NewFlagSet("prefetch", flag.ExitOnError)
	cfgPath := fs.String("config", "", "YAML configuration file of the mirror")
	server := fs.String("server", "", "mirror URL (default: from the config's addr)")
	token := fs.String("token", "", "admin token (default: MIRROR_ADMIN_TOKEN, admin.token, or <data_dir>/admin-token)")
	detach := fs.Bool("detach", false, "enqueue and print the job ID; do not follow")
	var platforms stringList
	fs.Var(&platforms, "platform", "platform to fetch, like linux/amd64 (repeatable; default all)")
	const use = "usage: mirror prefetch IMAGE [--platform os/arch]... [--detach]   e.g. nvidia/pytorch:24.05-py3"
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), use)
		fmt.Fprint(fs.Output(), followHelp)
		fs.PrintDefaults()
	}
	_ = fs.Parse(reorder(fs, args))
	if fs.NArg() != 1 {
		fmt.Fprintln(os.Stderr, use)
		return 2
	}
	c, err := newAdminClient(*cfgPath, *server, *token)
	if err != nil {
		fmt.Fprintln(os.Stderr, "prefetch:", err)
		return 2
	}
	var resp struct{ Jobs []state.Job }
	if err := c.do(http.MethodPost, admin.Prefix+"/prefetch", admin.PrefetchRequest{Image: fs.Arg(0), Platforms: platforms}, &resp); err != nil {
		fmt.Fprintln(os.Stderr, "prefetch:", err)
		return exitCode(err)
	}
	if len(resp.Jobs) != 1 {
		fmt.Fprintln(os.Stderr, "prefetch: unexpected answer")
		return 1
	}
	j := resp.Jobs[0]
	if *detach {
		fmt.Println(j.ID)
		return 0
	}
	return follow(c, j)
}

// follow polls a job and shows its progress until it ends: a live bar on
// a terminal, else (a log file, CI) a plain line every 10 seconds. It
// returns the exit code: 0 done, 1 failed, cancelled or the mirror lost.
func follow(c *adminClient, j state.Job) int { return followTo(c, j, os.Stdout, os.Stderr) }

// followTo is follow writing the summary to stdout and progress to
// stderr (a bar when stderr is a terminal). While the mirror does not
// answer, or answers the poll with an error (5xx: restarting, its state
// store unreachable), it retries up to 20 times in a row (10 s), saying on
// stderr once per change of what it meets (unreachable; each status with
// the OCI error's code and message, if the body is one) and again when
// the mirror answers the job. A 401 or 403 (the admin token refused:
// rotated, or a proxy in front) ends it at once with that answer and
// exitCode's status (1 for 401, 2 for 403, as for the first request):
// polling with the same token cannot succeed. The job goes on regardless.
func followTo(c *adminClient, j state.Job, stdout, stderr io.Writer) int {
	tty := false
	if f, ok := stderr.(*os.File); ok {
		tty = isTerminal(f)
	}
	var bar *progressbar.ProgressBar
	if tty && !j.Ended() {
		bar = newBar(stderr, jobImage(j))
	}
	nl := "" // a line of ours after the bar's starts on a line of its own
	if bar != nil {
		nl = "\n"
	}
	poll := c.poll
	if poll <= 0 {
		poll = 500 * time.Millisecond
	}
	failures := 0
	trouble := 0 // what the failing polls meet: 0 none, -1 no answer, else the status answered
	lastLine := time.Time{}
	for {
		if bar != nil {
			showProgress(bar, j)
		} else if !j.Ended() && time.Since(lastLine) >= 10*time.Second {
			fmt.Fprintln(stderr, progressLine(j))
			lastLine = time.Now()
		}
		if j.Ended() {
			break
		}
		time.Sleep(poll)
		var next state.Job
		if err := c.do(http.MethodGet, admin.Prefix+"/jobs/"+url.PathEscape(j.ID), nil, &next); err != nil {
			var ae *apiError
			answered := errors.As(err, &ae)
			if answered && (ae.Status == http.StatusUnauthorized || ae.Status == http.StatusForbidden) {
				fmt.Fprintf(stderr, "%smirror at %s refused to show job %s: %s; it goes on there (follow it again with a valid admin token: mirror jobs --follow %s)\n",
					nl, c.base, j.ID, answerText(ae), j.ID)
				return exitCode(err)
			}
			failures++
			if failures > 20 {
				last := err.Error()
				if answered {
					last = "it answered " + answerText(ae) // not a proxy's page
				}
				fmt.Fprintln(stderr, "\nprefetch: lost the mirror:", last)
				return 1
			}
			switch {
			case !answered && trouble != -1: // no answer at all
				trouble = -1
				fmt.Fprintf(stderr, "%smirror unreachable at %s; retrying\n", nl, c.base)
			case answered && trouble != ae.Status:
				trouble = ae.Status
				fmt.Fprintf(stderr, "%smirror at %s answered %s; retrying\n", nl, c.base, answerText(ae))
			}
			continue
		}
		switch {
		case trouble == -1:
			fmt.Fprintf(stderr, "%smirror at %s is reachable again\n", nl, c.base)
		case trouble != 0:
			fmt.Fprintf(stderr, "%smirror at %s answers again\n", nl, c.base)
		}
		trouble, failures = 0, 0
		j = next
	}
	if bar != nil {
		_ = bar.Finish()
		fmt.Fprintln(stderr)
	}
	return report(stdout, stderr, j)
}

// jobImage names a job's image: "nvidia/pytorch:24.05-py3".
func jobImage(j state.Job) string {
	if strings.Contains(j.Reference, ":") { // a digest
		return j.Repository + "@" + j.Reference
	}
	return j.Repository + ":" + j.Reference
}

// progressText is a job's state line: image, state, blobs and the blob
// being fetched. Before the job has resolved its manifests (no blob
// counted yet) it says so instead of "0/0 blobs".
func progressText(j state.Job) string {
	if j.BlobsTotal == 0 {
		if j.State == state.JobQueued {
			return fmt.Sprintf("%s [queued]", jobImage(j))
		}
		return fmt.Sprintf("%s [%s: resolving the image]", jobImage(j), j.State)
	}
	cur := ""
	if j.Current != "" {
		cur = " " + shortDigest(j.Current)
	}
	return fmt.Sprintf("%s [%s %d/%d blobs]%s", jobImage(j), j.State, j.BlobsDone, j.BlobsTotal, cur)
}

// progressLine is progressText with the bytes done of the total, once the
// total is known: the line written every 10 seconds when stderr is not a
// terminal.
func progressLine(j state.Job) string {
	if j.BytesTotal == 0 {
		return progressText(j)
	}
	return fmt.Sprintf("%s %s of %s", progressText(j), humanBytes(j.BytesDone), humanBytes(j.BytesTotal))
}

// newBar is the progress bar of a job on a terminal. It clears to the end
// of the line at each redraw (ANSI), so a shorter description after a
// longer one leaves no stale characters behind.
func newBar(w io.Writer, desc string) *progressbar.ProgressBar {
	return progressbar.NewOptions64(-1,
		progressbar.OptionSetWriter(w),
		progressbar.OptionShowBytes(true),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionSetWidth(30),
		progressbar.OptionThrottle(200*time.Millisecond),
		progressbar.OptionSetDescription(desc),
		progressbar.OptionSetRenderBlankState(true),
		progressbar.OptionUseANSICodes(true),
	)
}

// showProgress sets the bar to the bytes the job fetches from the upstream
// (of the bytes not cached before it), so that its rate and ETA are those
// of the download: blobs found in the cache already do not count as
// bytes fetched at some rate.
func showProgress(bar *progressbar.ProgressBar, j state.Job) {
	cachedBefore := j.BytesDone - j.BytesFetched
	if toFetch := j.BytesTotal - cachedBefore; j.BytesTotal > 0 && toFetch > 0 {
		bar.ChangeMax64(toFetch)
		_ = bar.Set64(j.BytesFetched)
	}
	bar.Describe(progressText(j))
}

// report prints how a job ended and returns the exit code: 0 done, 1
// failed or cancelled. A done job that fetched nothing says "already
// cached"; otherwise the summary gives what was fetched, at what rate.
func report(stdout, stderr io.Writer, j state.Job) int {
	took := j.Finished.Sub(j.Started)
	if j.Started.IsZero() || j.Finished.IsZero() || took < 0 {
		took = 0
	}
	took = took.Round(100 * time.Millisecond)
	switch j.State {
	case state.JobFailed:
		fmt.Fprintf(stderr, "prefetch %s failed after %s (%d/%d blobs), job %s:\n", jobImage(j), took, j.BlobsDone, j.BlobsTotal, j.ID)
		for _, e := range j.Errors {
			fmt.Fprintln(stderr, "  ", e)
		}
		return 1
	case state.JobCancelled:
		fmt.Fprintf(stderr, "prefetch %s cancelled (%d/%d blobs cached), job %s\n", jobImage(j), j.BlobsDone, j.BlobsTotal, j.ID)
		return 1
	}
	if j.BlobsFetched == 0 {
		fmt.Fprintf(stdout, "%s: already cached (%d blobs, %s), job %s\n", jobImage(j), j.BlobsTotal, humanBytes(j.BytesTotal), j.ID)
		return 0
	}
	rate := ""
	if took > 0 {
		rate = ", " + humanBytes(int64(float64(j.BytesFetched)/took.Seconds())) + "/s"
	}
	fmt.Fprintf(stdout, "prefetched %s: %d blobs (%d fetched, %d already cached), %s fetched in %s%s, job %s\n",
		jobImage(j), j.BlobsTotal, j.BlobsFetched, j.BlobsDone-j.BlobsFetched, humanBytes(j.BytesFetched), took, rate, j.ID)
	return 0
}

// humanBytes writes n bytes with a binary unit: "512 B", "1.5 MiB".
func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func shortDigest(d string) string {
	if i := strings.IndexByte(d, ':'); i >= 0 && len(d) > i+13 {
		return d[:i+13]
	}
	return d
}

// reorder moves flags before positional arguments, so that
// "mirror prefetch IMAGE --platform linux/amd64" works with package flag.
func reorder(fs *flag.FlagSet, args []string) []string {
	var flags, pos []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			pos = append(pos, args[i+1:]...)
			break
		}
		if strings.HasPrefix(a, "-") {
			flags = append(flags, a)
			if !strings.Contains(a, "=") && i+1 < len(args) && takesValue(fs, a) {
				flags = append(flags, args[i+1])
				i++
			}
			continue
		}
		pos = append(pos, a)
	}
	return append(flags, pos...)
}

// takesValue reports whether flag argument "-name" or "--name" is followed
// by its value (not a boolean flag of fs).
func takesValue(fs *flag.FlagSet, flagArg string) bool {
	f := fs.Lookup(strings.TrimLeft(flagArg, "-"))
	if f == nil {
		return true
	}
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return !ok || !b.IsBoolFlag()
}

// tagsCmd: mirror tags REPOSITORY [--monthly] [--refresh] lists the tags
// the mirror tracks, with release, variant, digest, platforms and how much
// of each image is cached.
func tagsCmd(args []string) int {
	fs := flag.NewFlagSet("tags", flag.ExitOnError)
	cfgPath := fs.String("config", "", "YAML configuration file of the mirror")
	server := fs.String("server", "", "mirror URL (default: from the config's addr)")
	token := fs.String("token", "", "admin token (default: MIRROR_ADMIN_TOKEN, admin.token, or <data_dir>/admin-token)")
	monthly := fs.Bool("monthly", false, "only NGC monthly tags (YY.MM-variant)")
	refresh := fs.Bool("refresh", false, "poll the upstream's tag list first")
	_ = fs.Parse(reorder(fs, args))
	if fs.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: mirror tags REPOSITORY [--monthly] [--refresh]   e.g. nvidia/pytorch")
		return 2
	}
	c, err := newAdminClient(*cfgPath, *server, *token)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tags:", err)
		return 2
	}
	q := url.Values{"repository": {fs.Arg(0)}}
	if *monthly {
		q.Set("monthly", "true")
	}
	if *refresh {
		q.Set("refresh", "true")
	}
	var resp struct {
		Tags []admin.TagInfo `json:"tags"`
	}
	if err := c.do(http.MethodGet, admin.Prefix+"/tags?"+q.Encode(), nil, &resp); err != nil {
		fmt.Fprintln(os.Stderr, "tags:", err)
		return exitCode(err)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TAG\tRELEASE\tVARIANT\tDIGEST\tPLATFORMS\tCACHED")
	for _, t := range resp.Tags {
		cached := t.Cached
		if len(t.CachedPlatforms) > 0 && t.Cached != "full" {
			cached += " (" + strings.Join(t.CachedPlatforms, ",") + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", t.Name, dash(t.Release), dash(t.Variant), dash(shortDigest(t.Digest)),
			dash(strings.Join(t.Platforms, ",")), cached)
	}
	_ = tw.Flush()
	return 0
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// followHelp is what `mirror jobs -h` and `mirror prefetch -h` say of
// following a job (followTo).
const followHelp = `
--follow (and prefetch without --detach) shows the job's progress until it
ends: exit 0 done, 1 failed or cancelled. While the mirror does not answer,
or answers with an error (a 5xx while it restarts or its state store is
down), it keeps polling for up to 10 s (then exit 1), saying so on stderr
once per change (unreachable, or the status with the mirror's error code
and message) and again when the mirror answers. A 401 or 403 (the admin
token refused: it changed, or a proxy in front refuses it) stops it at
once with that answer, exit 1 (401) or 2 (403) as for a first request;
the job itself goes on on the mirror.

`

// jobsCmd lists, follows and cancels prefetch jobs on the running mirror:
//
//	mirror jobs [--state queued|running|done|failed|cancelled]
//	mirror jobs --follow ID     (progress until it ends; exit as prefetch, see followHelp)
//	mirror jobs cancel ID       (exit 0 cancelled, 1 ended already, 2 unknown)
func jobsCmd(args []string) int {
	fs := flag.NewFlagSet("jobs", flag.ExitOnError)
	cfgPath := fs.String("config", "", "YAML configuration file of the mirror")
	server := fs.String("server", "", "mirror URL (default: from the config's addr)")
	token := fs.String("token", "", "admin token (default: MIRROR_ADMIN_TOKEN, admin.token, or <data_dir>/admin-token)")
	st := fs.String("state", "", "only jobs in this state: queued, running, done, failed or cancelled")
	followID := fs.String("follow", "", "show the progress of job `ID` until it ends")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: mirror jobs [--state STATE] | mirror jobs --follow ID | mirror jobs cancel ID")
		fmt.Fprint(fs.Output(), followHelp)
		fs.PrintDefaults()
	}
	_ = fs.Parse(reorder(fs, args))
	cancel := fs.NArg() == 2 && fs.Arg(0) == "cancel"
	if (fs.NArg() != 0 && !cancel) || (*followID != "" && (cancel || *st != "")) {
		fs.Usage()
		return 2
	}
	c, err := newAdminClient(*cfgPath, *server, *token)
	if err != nil {
		fmt.Fprintln(os.Stderr, "jobs:", err)
		return 2
	}
	switch {
	case cancel:
		var j state.Job
		if err := c.do(http.MethodPost, admin.Prefix+"/jobs/"+url.PathEscape(fs.Arg(1))+"/cancel", nil, &j); err != nil {
			fmt.Fprintln(os.Stderr, "jobs cancel:", err)
			var ae *apiError
			if errors.As(err, &ae) && len(ae.Errors) > 0 && ae.Errors[0].Code == "JOB_ENDED" {
				return 1
			}
			return exitCode(err)
		}
		fmt.Printf("cancelled job %s (%s, %d/%d blobs cached)\n", j.ID, jobImage(j), j.BlobsDone, j.BlobsTotal)
		return 0
	case *followID != "":
		var j state.Job
		if err := c.do(http.MethodGet, admin.Prefix+"/jobs/"+url.PathEscape(*followID), nil, &j); err != nil {
			fmt.Fprintln(os.Stderr, "jobs:", err)
			return exitCode(err)
		}
		return follow(c, j)
	}
	q := ""
	if *st != "" {
		q = "?" + url.Values{"state": {*st}}.Encode()
	}
	var resp struct {
		Jobs []state.Job `json:"jobs"`
	}
	if err := c.do(http.MethodGet, admin.Prefix+"/jobs"+q, nil, &resp); err != nil {
		fmt.Fprintln(os.Stderr, "jobs:", err)
		return exitCode(err)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATE\tIMAGE\tPLATFORMS\tRULE\tBLOBS\tBYTES\tFETCHED\tUPDATED")
	for _, j := range resp.Jobs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d/%d\t%s/%s\t%s\t%s\n", j.ID, j.State, jobImage(j), dash(strings.Join(j.Platforms, ",")),
			dash(j.Rule), j.BlobsDone, j.BlobsTotal, humanBytes(j.BytesDone), humanBytes(j.BytesTotal), humanBytes(j.BytesFetched),
			j.Updated.Local().Format(time.DateTime))
	}
	_ = tw.Flush()
	return 0
}
