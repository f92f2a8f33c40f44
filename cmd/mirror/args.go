package main

import (
	"flag"
	"fmt"
	"io"
)

// strayArgs reports whether fs, parsed for command name, which takes only
// flags, was given a positional argument, and says so on w (a usage
// error: the caller exits 2). A stray word would otherwise end flag
// parsing silently: "mirror gc now --dry-run" must not collect for real,
// nor "mirror serve extra" start a mirror with defaults.
func strayArgs(w io.Writer, name string, fs *flag.FlagSet) bool {
	if fs.NArg() == 0 {
		return false
	}
	fmt.Fprintf(w, "%s: unexpected argument %q (it takes only flags; see mirror %s -h)\n", name, fs.Arg(0), name)
	return true
}
