"""The crash test, short: `isdr run` killed with SIGKILL ten times at random moments while three
senders stream series, then everything is allowed to finish (tests/support/chaos.py says what is
counted and how; scripts/chaos.py runs the long version)."""

from tests.support.chaos import ChaosConfig, run_chaos


def test_ten_random_kills_of_isdr_run_lose_nothing_and_run_nothing_twice(tmp_path, dcmtk):
    report = run_chaos(ChaosConfig(mode="run", kills=10, series=24, workdir=tmp_path, seed=7,
                                   settle_timeout=240))
    print(report.table())
    assert len(report.kills) == 10 and report.acknowledged > 0 and report.deliveries > 0
    assert not report.violations(), "\n".join([report.table(), *report.stuck, *report.tasks_failed,
                                              *map(str, report.lost)])
