-- Nothing on SQLite: a relay serves one file and is woken by its own
-- process's commits (and polls for other processes').
SELECT 1;
