"""`isdr run`'s /readyz (HEALTH_PORT): ready while its storage takes a durable write."""

from __future__ import annotations

import requests

from tests.support.processes import free_port, wait_until
from tests.support.relay_process import RelayProcess


def readyz(port: int) -> tuple[int, str]:
    response = requests.get(f"http://127.0.0.1:{port}/readyz?verbose", timeout=10)
    return response.status_code, response.text


def test_isdr_run_is_not_ready_while_its_storage_cannot_take_a_write(tmp_path):
    health_port = free_port()
    relay = RelayProcess(tmp_path, env={"HEALTH_PORT": str(health_port), "MIN_FREE_BYTES": "0"}).start()
    try:
        wait_until(lambda: readyz(health_port)[0] == 200, 30, what="ready")
        assert readyz(health_port) == (200, "[+]storage ok\nreadyz check passed\n")
        away = tmp_path / "relay-data.away"
        relay.data_dir.rename(away)
        relay.data_dir.write_text("the disk went away")
        status, body = wait_until(lambda: (answer := readyz(health_port))[0] == 503 and answer, 30,
                                  what="not ready")
        assert f"[-]storage failed: cannot write to local directory {relay.data_dir}" in body
        relay.data_dir.unlink()
        away.rename(relay.data_dir)
        wait_until(lambda: readyz(health_port)[0] == 200, 30, what="ready again")
        assert relay.alive()
        assert "not ready: storage" in relay.log() and "ready again: storage is usable" in relay.log()
    finally:
        relay.stop()
