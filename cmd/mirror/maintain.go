package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/ngc-mirror/ngc-mirror/internal/config"
	"github.com/ngc-mirror/ngc-mirror/internal/dirlock"
	"github.com/ngc-mirror/ngc-mirror/internal/storage"
)

// openStore opens the cache the configuration names. dataDir is the
// absolute local data directory (the cache itself, or the spool's home with
// S3).
func openStore(ctx context.Context, cfg config.Config) (store *storage.Store, dataDir string, err error) {
	if dataDir, err = filepath.Abs(cfg.Storage.DataDir); err != nil {
		return nil, "", err
	}
	o := cfg.Storage.S3
	store, err = storage.Open(ctx, storage.Options{Driver: cfg.Storage.Driver, Dir: dataDir, S3: storage.S3Options{
		Bucket: o.Bucket, Region: o.Region, Endpoint: o.Endpoint, PathStyle: o.PathStyle,
		Prefix: o.Prefix, AccessKey: o.AccessKey, SecretKey: o.SecretKey, ChunkSize: o.ChunkSize,
		Redirect: o.Redirect,
	}})
	return store, dataDir, err
}

// loadForTool parses a maintenance command's flags (--config plus its own)
// and loads the configuration; it exits 2 on errors.
func loadForTool(name string, args []string, define func(*flag.FlagSet)) config.Config {
	fs := flag.NewFlagSet(name, flag.ExitOnError)
	cfgPath := fs.String("config", "", "YAML configuration file (see configs/mirror.yaml)")
	define(fs)
	_ = fs.Parse(args)
	if strayArgs(os.Stderr, name, fs) {
		os.Exit(2)
	}
	cfg, err := loadConfig(*cfgPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if cfg.Storage.Driver == "filesystem" {
		// A wrong working directory or configuration must not check (or
		// collect) an empty directory and call it clean.
		dir, _ := filepath.Abs(cfg.Storage.DataDir)
		if _, err := os.Stat(dir); err != nil {
			fmt.Fprintf(os.Stderr, "%s: no cache at %s (storage.data_dir): give the running mirror's configuration (--config FILE or MIRROR_CONFIG; default %s)\n",
				name, dir, config.DefaultPath)
			os.Exit(2)
		}
	}
	return cfg
}

// fsck rehashes every cached blob and manifest. Exit code: 0 clean, 1
// damage found (whatever the repair), 2 usage or I/O errors. It shows
// progress when stderr is a terminal.
func fsck(args []string) int {
	repair := "report"
	cfg := loadForTool("fsck", args, func(fs *flag.FlagSet) {
		fs.StringVar(&repair, "repair", repair, "what to do with damaged content: report, quarantine (move under _quarantine) or delete")
	})
	mode, ok := map[string]storage.Repair{"report": storage.ReportOnly, "quarantine": storage.Quarantine, "delete": storage.Delete}[repair]
	if !ok {
		fmt.Fprintf(os.Stderr, "fsck: --repair %q: want report, quarantine or delete\n", repair)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	store, _, err := openStore(ctx, cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fsck:", err)
		return 2
	}
	var progress storage.CheckProgress
	if isTerminal(os.Stderr) {
		last := time.Time{}
		progress = func(o, to, b, tb int64) {
			if time.Since(last) > 200*time.Millisecond || o == to {
				last = time.Now()
				fmt.Fprintf(os.Stderr, "\rfsck: %d/%d objects, %d/%d MiB", o, to, b>>20, tb>>20)
				if o == to {
					fmt.Fprintln(os.Stderr)
				}
			}
		}
	}
	res, err := store.Check(ctx, mode, progress)
	for _, d := range res.Damaged {
		fmt.Printf("DAMAGED %s %s: %s\n", d.Kind, d.Digest, d.Problem)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "fsck:", err)
		return 2
	}
	if len(res.Damaged) > 0 {
		fmt.Printf("fsck: %s: %d damaged objects (%s) of %s\n", store.Location(), len(res.Damaged), repair, tally(res.Checked))
		return 1
	}
	fmt.Printf("fsck: %s: clean (%s)\n", store.Location(), tally(res.Checked))
	return 0
}

// tally says what fsck or gc looked at: "12 blobs, 6 manifests, 1.2 GiB".
func tally(t storage.Tally) string {
	return fmt.Sprintf("%d blobs, %d manifests, %s", t.Blobs, t.Manifests, humanBytes(t.Bytes))
}

// gc removes blobs no cached manifest refers to and stale uploads. It is
// safe while the mirror serves (see storage.GC).
func gc(args []string) int {
	dry := false
	grace := time.Hour
	cfg := loadForTool("gc", args, func(fs *flag.FlagSet) {
		fs.BoolVar(&dry, "dry-run", false, "report what would be removed, remove nothing")
		fs.DurationVar(&grace, "grace", grace, "keep blobs and uploads younger than this")
	})
	if grace < 0 {
		fmt.Fprintf(os.Stderr, "gc: --grace %v: must not be negative (it keeps blobs and uploads younger than this)\n", grace)
		return 2
	}
	store, _, err := openStore(context.Background(), cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "gc:", err)
		return 2
	}
	res, err := store.GC(context.Background(), grace, dry)
	if err != nil {
		fmt.Fprintln(os.Stderr, "gc:", err)
		return 2
	}
	verb := "removed"
	if dry {
		verb = "would remove"
	}
	fmt.Printf("gc: %s: checked %s; %s %d unreferenced blobs (%d bytes) and %d stale uploads (%d bytes)\n",
		store.Location(), tally(res.Checked), verb, res.Blobs, res.BlobBytes, res.Uploads, res.UploadBytes)
	return 0
}

func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// lockDataDir takes the exclusive lock of a filesystem cache's data
// directory (<data_dir>/.lock, held until the process ends), so that a
// second `mirror serve` on it refuses to start, naming the holder's PID.
// A cache that is not exclusive (S3: replicas share the bucket by design)
// takes none. On a disk that cannot be written and holds no lock file the
// mirror serves unlocked (nothing can write there) and returns a nil
// lock: the caller then removes no uploads.
func lockDataDir(store *storage.Store, dataDir string, log *slog.Logger) (*dirlock.Lock, error) {
	if !store.Capabilities().Exclusive {
		return nil, nil
	}
	l, err := dirlock.Acquire(dataDir)
	var held *dirlock.HeldError
	switch {
	case errors.As(err, &held):
		who := "another process"
		if held.PID != 0 {
			who = fmt.Sprintf("process %d", held.PID)
		}
		return nil, fmt.Errorf("data_dir %s is in use by %s (another mirror serve?; lock file %s): stop it, or give this mirror its own "+
			"storage.data_dir (MIRROR_DATA_DIR); replicas share a cache through storage.driver s3 instead", dataDir, who, held.Path)
	case errors.Is(err, dirlock.ErrUnlockable):
		log.Warn("cannot lock the data directory (read-only disk?); uploads of interrupted fills are not removed", "data_dir", dataDir, "err", err)
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("locking data_dir %s: %w", dataDir, err)
	}
	return l, nil
}
