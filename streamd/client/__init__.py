"""The Producer API that applications use to write events. It never imports the daemon."""
