"""The control socket: a Unix socket per mounted daemon (docs/CONTROL.md)."""
