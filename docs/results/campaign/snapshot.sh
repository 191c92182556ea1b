#!/usr/bin/env bash
# Copy the campaign's live databases ($RUNS, default runs/) into docs/results/campaign/, consistently
# while sweeps write to them (SQLite's online backup), so that they can be committed as they grow and the
# campaign resumed anywhere: RUNS=somewhere; cp docs/results/campaign/*.db "$RUNS"/; bash run.sh.
# Each run's probe table (probe.parquet, the Glorot/He figures' data, tens of kB) is copied beside them as
# probes/<database>/<run_id>.parquet, for `initscope report --probes` (reports.sh) on any machine.
set -euo pipefail
RUNS=${RUNS:-runs}
here=$(dirname "$0")
for db in "$RUNS"/*.db; do
    name=$(basename "$db" .db)
    python3 - "$db" "$here/$name.db" "$here/probes/$name" <<'PY'
import shutil, sqlite3, sys
from pathlib import Path
src, dst, probes = sys.argv[1:]
s, d = sqlite3.connect(src), sqlite3.connect(dst)
s.backup(d)
d.execute("PRAGMA journal_mode=DELETE")  # one file, no -wal beside it to forget
d.close()
for run_id, run_dir in s.execute("SELECT run_id, run_dir FROM runs WHERE run_dir IS NOT NULL"):
    probe = Path(run_dir) / "probe.parquet"
    if probe.is_file():
        Path(probes).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(probe, Path(probes) / f"{run_id}.parquet")
s.close()
PY
done
ls -l "$here"/*.db
