package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"unicode"

	"golang.org/x/crypto/bcrypt"
)

// htpasswdCmd is "mirror htpasswd USER": it reads USER's password from
// the first line of stdin and prints the line for access.htpasswd_file
// ("USER:$2a$10$..."), a bcrypt hash as "htpasswd -B" writes, for
// machines without apache2-utils. Exit 2 on a usage error.
func htpasswdCmd(args []string) int {
	fs := flag.NewFlagSet("htpasswd", flag.ExitOnError)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: mirror htpasswd USER < password   (prints USER:BCRYPT-HASH for access.htpasswd_file)")
	}
	_ = fs.Parse(args)
	if fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	line, err := htpasswdLine(fs.Arg(0), os.Stdin, bcrypt.DefaultCost)
	if err != nil {
		fmt.Fprintln(os.Stderr, "htpasswd:", err)
		return 2
	}
	fmt.Println(line)
	return 0
}

// htpasswdLine returns "user:hash" for the password on the first line of
// in (its line break dropped), hashed with bcrypt at cost. Errors: a user
// name that is empty or has a colon, blank or control characters; an
// empty password or one over bcrypt's 72 bytes.
func htpasswdLine(user string, in io.Reader, cost int) (string, error) {
	if user == "" || strings.ContainsFunc(user, func(r rune) bool { return r == ':' || unicode.IsSpace(r) || unicode.IsControl(r) }) {
		return "", fmt.Errorf("user name %q: want a non-empty name without colons, blanks or control characters", user)
	}
	pw, err := bufio.NewReader(io.LimitReader(in, 1<<10)).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("reading the password from stdin: %w", err)
	}
	pw = strings.TrimSuffix(strings.TrimSuffix(pw, "\n"), "\r")
	switch {
	case pw == "":
		return "", errors.New("no password on stdin (e.g. printf '%s\\n' \"$PASSWORD\" | mirror htpasswd USER)")
	case len(pw) > 72:
		return "", errors.New("the password is longer than bcrypt's 72 bytes")
	}
	h, err := bcrypt.GenerateFromPassword([]byte(pw), cost)
	if err != nil {
		return "", err
	}
	return user + ":" + string(h), nil
}
