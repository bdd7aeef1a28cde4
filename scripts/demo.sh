#!/usr/bin/env bash
# The relay's main job, end to end on one machine, on its embedded defaults:
#   sample CT series --storescu--> isdr run --HTTPS--> InferenceServer emulator
#                                           --C-STORE--> storescp (a stand-in PACS)
# Everything runs from ./demo-data and is stopped when the demo ends (or on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
ISDR=${ISDR:-isdr}
# dcmtk's programs, not pynetdicom's console scripts of the same names.
for tool in storescu storescp dcmdump; do
  command -v "/usr/bin/$tool" >/dev/null || { echo "dcmtk is missing: run make system-deps" >&2; exit 2; }
done
export TCP_NODELAY=1  # dcmtk keeps Nagle's algorithm on otherwise (every C-STORE waits ~40 ms)

DEMO=demo-data
rm -rf "$DEMO"
mkdir -p "$DEMO"/{fingerprints,incoming,pacs,emulator}
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "Starting the InferenceServer emulator (HTTPS, with a CA of its own)"
"$ISDR" emulator --port 0 --port-file "$DEMO/emulator/port" --tls-dir "$DEMO/emulator/tls" \
  --data-dir "$DEMO/emulator/tasks" --delay 3 >"$DEMO/emulator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$DEMO/emulator/port" ] && break; sleep 0.1; done
EMULATOR_URL="https://127.0.0.1:$(cat "$DEMO/emulator/port")"
echo "InferenceServer at $EMULATOR_URL (log: $DEMO/emulator.log)"

step "Starting a destination PACS (dcmtk storescp)"
PACS_PORT=$(free_port)
/usr/bin/storescp -aet PACS --output-directory "$DEMO/pacs" --accept-all "$PACS_PORT" >"$DEMO/pacs.log" 2>&1 &
pids+=($!)
echo "PACS at 127.0.0.1:$PACS_PORT, AE title PACS"

step "Writing a fingerprint: CT series go to model 'toy', predictions to PACS"
cat >"$DEMO/fingerprints/ct-organs.yaml" <<YAML
apiVersion: isdr.io/v1alpha1
kind: Fingerprint
metadata:
  name: ct-organs
spec:
  match:
    modality: "^CT$"
  inferenceServer:
    url: $EMULATOR_URL
    protocol: v2
    model: toy
  destinations:
    - host: 127.0.0.1
      port: $PACS_PORT
      aeTitle: PACS
YAML
cat "$DEMO/fingerprints/ct-organs.yaml"

step "Starting the relay: isdr run (embedded defaults; logs below)"
RELAY_PORT=$(free_port)
CERT_FILE="$DEMO/emulator/tls/ca.pem" FINGERPRINT_DIR="$DEMO/fingerprints" INCOMING_DIR="$DEMO/incoming" \
  SCP_PORT="$RELAY_PORT" "$ISDR" run > >(sed -u 's/^/    relay | /') 2>&1 &
pids+=($!)
for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$RELAY_PORT") 2>/dev/null && break; sleep 0.1; done

step "Sending a synthetic 20-slice CT series with dcmtk storescu"
"$ISDR" sample ct "$DEMO/sample" --count 20 >/dev/null
/usr/bin/storescu -aet SCANNER -aec ISDR 127.0.0.1 "$RELAY_PORT" "$DEMO"/sample/*.dcm
echo "sent $(ls "$DEMO"/sample/*.dcm | wc -l) instances; the relay waits POST_AFTER=10s of quiet, then posts"

step "Waiting for the predictions to arrive at the PACS"
for _ in $(seq 120); do
  if [ -n "$(ls -A "$DEMO/pacs")" ]; then break; fi
  sleep 1
done
sleep 1
if [ -z "$(ls -A "$DEMO/pacs")" ]; then
  echo "no predictions arrived; see $DEMO/emulator.log and the relay's log above" >&2
  exit 1
fi
for f in "$DEMO"/pacs/*; do
  echo "received $f:"
  /usr/bin/dcmdump +P Modality +P SOPClassUID +P StructureSetLabel +P ROIName +P SeriesDescription "$f" | sed 's/^/    /'
done
step "Done: DICOM in, inference, DICOM out."
