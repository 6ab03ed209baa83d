"""The per-op harness of stage 2: harness.py (candidates checked and timed in a child process, leaderboards) and
child.py (the engine-side process, run by path with only the engine's src on its path)."""
