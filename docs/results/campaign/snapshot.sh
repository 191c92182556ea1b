#!/usr/bin/env bash
# Copy the campaign's live databases ($RUNS, default runs/) into docs/results/campaign/, consistently
# while sweeps write to them (SQLite's online backup), so that they can be committed as they grow and the
# campaign resumed anywhere: RUNS=somewhere; cp docs/results/campaign/*.db "$RUNS"/; bash run.sh.
set -euo pipefail
RUNS=${RUNS:-runs}
here=$(dirname "$0")
for db in "$RUNS"/*.db; do
    python3 -c "import sqlite3, sys; s = sqlite3.connect(sys.argv[1]); d = sqlite3.connect(sys.argv[2]); s.backup(d); d.close(); s.close()" \
        "$db" "$here/$(basename "$db")"
done
ls -l "$here"/*.db
