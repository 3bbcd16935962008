"""What streamd tells its operator: logs, metrics, the status file, the monitor and its
dashboard, the log viewer."""
