"""One child process: its consumer tasks, its reaper, and the start-up and drain around them."""
