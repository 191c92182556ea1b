#!/usr/bin/env bash
# Regenerate docs/results' reports from the committed databases (docs/results/campaign/*.db, copied from
# the live ones by snapshot.sh). Run from the repository root; needs no data. Each report is skipped
# while its database holds no run of it yet.
set -euo pipefail
here=docs/results/campaign
out=docs/results
report() {  # db, folder, title, filters...
    local name=$1 db=$here/$1.db dir=$out/$2 title=$3; shift 3
    [ -f "$db" ] || return 0
    rm -rf "$dir"
    initscope report "$db" --out "$dir" --title "$title" --probes "$here/probes/$name" "$@" || { echo "skipped $dir (no runs yet)"; rm -rf "$dir"; return 0; }
    # The repository keeps report.md, the CSVs and the PNGs; the interactive report.html (5 MB, plotly.js
    # inline) and the SVGs are remade by this script and not committed (docs/results/.gitignore).
    rm -f "$dir"/figures/*.svg
}
report poster poster_table1 "The ASV poster's Table 1 at 50 epochs: plain34 (width 8), Food-101's first 10 classes at 48x48, Adam" \
    --where model=plain34
report poster poster_table2 "The ASV poster's Table 2 at 50 epochs: plain50 (width 8), Food-101's first 10 classes at 48x48, Adam" \
    --where model=plain50 --where optimizer=adam
report poster poster_table3 "The ASV poster's Table 3: plain50 (width 8), five optimizers" \
    --where model=plain50 --where method=xavier,kaiming-forward,kaiming-backward,asv-forward,asv-backward,asv-forward-exact,asv-balanced,lsuv
report depth depth "Depth: BatchNorm-free CIFAR ResNet-20/56/110 on Fashion-MNIST, Fixup and initscope's residual policies"
report glorot_he glorot_he "The Glorot/He study: MobileNet v1 and ResNet-50 on plant seedlings (64x64)"
