"""The pre-fork supervisor: the arbiter, its children and their pipe protocol, the restart
policy, sd_notify. It imports the worker only from the child entry point, after fork."""
