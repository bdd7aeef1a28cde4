"""A fingerprint expression that backtracks catastrophically cannot stop the relay (issue 11).

With Python's `re`, `(a+)+$` searched in sixty `a`s and a `!` tries 2^60 ways to split the
`a`s: the relay matched series under the lock its receiver needs, so C-ECHO and C-STORE froze
too. Expressions are now evaluated with RE2, in linear time. Every peer is a real process:
dcmtk's storescu and echoscu send to `isdr run`.
"""

from __future__ import annotations

import time

from isdr_devtools.synthetic import write_ct_series
from tests.integration.test_relay_end_to_end import send
from tests.support.dicom_peers import echoscu
from tests.support.fingerprints import manifest

BACKTRACKING = "(a+)+$"
HOSTILE_DESCRIPTION = "a" * 60 + "!"


def test_a_catastrophically_backtracking_expression_neither_freezes_matching_nor_the_receiver(
        tmp_path, emulator, pacs, relays, dcmtk):
    relay = relays()
    fingerprint = manifest("backtracking", emulator.base_url, "toy", pacs, modality="CT")
    fingerprint["spec"]["match"]["seriesDescription"] = BACKTRACKING
    relay.add_manifest(fingerprint)
    relay.start()
    relay.wait_for_log(r"loaded 1 fingerprints.*backtracking")  # RE2 takes the expression

    hostile = write_ct_series(tmp_path / "hostile", count=2, rows=16, cols=16,
                              series_description=HOSTILE_DESCRIPTION)
    send(relay, hostile)
    sent = time.monotonic()
    relay.wait_for_log(r"matches no fingerprint", timeout=60)
    detected = time.monotonic() - sent
    # The series was matched (and found not to match) while the receiver keeps answering.
    assert echoscu(relay.port, called_ae=relay.ae_title).returncode == 0

    matching = write_ct_series(tmp_path / "matching", count=2, rows=16, cols=16,
                               series_description="Thorax " + "a" * 56)
    send(relay, matching)
    assert len(pacs.wait_for_files(1, timeout=60)) == 1
    assert emulator.stats()["submits"] == 1 and relay.alive()
    print(f"\n{BACKTRACKING!r} against {len(HOSTILE_DESCRIPTION)} characters: unmatched "
          f"{detected:.2f}s after storescu finished (POST_AFTER=1s)")
