package main

import (
	"context"
	"io"
	"log/slog"
	"sort"
	"strings"

	"github.com/sirupsen/logrus"
)

// routeLogrus sends what distribution's packages log through logrus (the
// htpasswd authenticator's "user failed to authenticate", for one) to log,
// in the slog format of every other line, instead of logrus's own format
// on stderr. logrus filters nothing itself: log's handler decides by
// level. Fields become attributes (sorted), except distribution's
// go.version, which the build info metric already says, and any field
// named like a password (the htpasswd controller logs the one it
// provisions when the file is missing; checkHtpasswd refuses that first).
func routeLogrus(log *slog.Logger) {
	std := logrus.StandardLogger()
	std.SetOutput(io.Discard)
	std.SetLevel(logrus.DebugLevel)
	std.ReplaceHooks(logrus.LevelHooks{})
	std.AddHook(slogHook{log: log.With("component", "distribution")})
}

// slogHook is a logrus hook that writes each entry to an slog.Logger.
type slogHook struct{ log *slog.Logger }

func (slogHook) Levels() []logrus.Level { return logrus.AllLevels }

func (h slogHook) Fire(e *logrus.Entry) error {
	level := slog.LevelDebug
	switch {
	case e.Level <= logrus.ErrorLevel: // panic, fatal, error
		level = slog.LevelError
	case e.Level == logrus.WarnLevel:
		level = slog.LevelWarn
	case e.Level == logrus.InfoLevel:
		level = slog.LevelInfo
	}
	ctx := e.Context
	if ctx == nil {
		ctx = context.Background()
	}
	if !h.log.Enabled(ctx, level) {
		return nil
	}
	keys := make([]string, 0, len(e.Data))
	for k := range e.Data {
		if k != "go.version" && !strings.Contains(strings.ToLower(k), "password") {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	attrs := make([]slog.Attr, 0, len(keys))
	for _, k := range keys {
		v := e.Data[k]
		if err, ok := v.(error); ok {
			v = err.Error()
		}
		attrs = append(attrs, slog.Any(k, v))
	}
	h.log.LogAttrs(ctx, level, e.Message, attrs...)
	return nil
}
