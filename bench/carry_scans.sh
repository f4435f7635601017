#!/usr/bin/env bash
# Copies into .realscans/ (ignored; name it in the device call's carry) the real scans that the GPU suite's
# real_scans part scores, for the GPU machine has no mricron-data: Colin27's ch2bet.nii.gz and aal.nii.gz
# (Debian's mricron-data, BSD-3) into .realscans/colin27/, and each further labelled dataset folder
# (imagesTr/, labelsTr/) given as NAME=FOLDER into .realscans/NAME/ (your own checks; never committed).
#   bash bench/carry_scans.sh [NAME=FOLDER ...]
#   then: run(command="OUT=$OUT SUITE_REAL_SCANS='NAME=.realscans/NAME=PROTOCOL_MAP' bash bench/gpu_suite.sh real_scans",
#             carry=[".whl", ".realscans"])
set -euo pipefail
cd "$(dirname "$0")/.."
templates=$("${PYTHON:-python3}" -c "from expseg_fast.data import anatomy; print(anatomy.COLIN27)")
rm -rf .realscans && mkdir -p .realscans/colin27
cp "$templates/ch2bet.nii.gz" "$templates/aal.nii.gz" .realscans/colin27/
for set in "$@"; do cp -rL "${set#*=}" ".realscans/${set%%=*}"; done
du -sh .realscans
