#!/usr/bin/env bash
# The campaign of docs/results, in the order it was run (6.3 CPU-hours on 2 cores, 7.6 budgeted; see
# docs/experiments.md#the-papers-campaign). Run from the repository root with the data beside it
# (../shared/data, or pass DATA_ROOT=...). Every sweep resumes where it stopped: run this again after a
# stop, or on another machine after copying the committed databases back (RUNS=... below).
#
# The live databases and run folders are in $RUNS (default runs/, not committed); snapshot.sh copies the
# databases into docs/results/campaign/ to be committed as they grow.
set -euo pipefail
DATA_ROOT=${DATA_ROOT:-../shared/data}
RUNS=${RUNS:-runs}
PARALLEL=${PARALLEL:-2}
sweep() { initscope sweep "$1" --data-root "$DATA_ROOT" --db "$RUNS/$2.db" --out "$RUNS/$2" --parallel "$PARALLEL"; }

sweep examples/poster_table1.toml poster
sweep examples/depth.toml depth
sweep examples/depth_residual.toml depth
sweep examples/glorot_he_mobilenet.toml glorot_he
sweep examples/glorot_he_resnet.toml glorot_he
sweep examples/poster_table2.toml poster
sweep examples/poster_table3.toml poster
# The grids of the three poster tables were widened afterwards where a choice lay at an edge (their
# files hold the final grids): running them again trains only the new rates.
