package config

import "os"

// DefaultPath is the configuration file of an installed mirror (the
// systemd unit and the container image run `serve --config DefaultPath`).
// Every command reads it when neither --config nor MIRROR_CONFIG names a
// file, so that `mirror prefetch`, `mirror fsck` and the others find the
// running mirror's address, data directory and admin token from any working
// directory.
const DefaultPath = "/etc/ngc-mirror/mirror.yaml"

// FindFile returns the configuration file a command loads: flagValue
// (--config) when set, else $MIRROR_CONFIG, else DefaultPath when it
// exists, else "" (the embedded defaults and the environment only).
func FindFile(flagValue string, getenv func(string) string) string {
	return findFile(flagValue, getenv, DefaultPath)
}

func findFile(flagValue string, getenv func(string) string, defaultPath string) string {
	if flagValue != "" {
		return flagValue
	}
	if p := getenv("MIRROR_CONFIG"); p != "" {
		return p
	}
	if _, err := os.Stat(defaultPath); err == nil {
		return defaultPath
	}
	return ""
}
