"""10,000 mutated tars (bench/fuzz_tar.py, fixed seed) through the download-time check and,
when it passes, the unpacker: no uncaught exception, no input over the time limit, nothing
written outside the root, and no structural error in the unpacker that the check let
through. bench/fuzz_tar.py runs the same campaign for a million inputs (docs/unpacker.md)."""

from __future__ import annotations

from bench.fuzz_tar import campaign


def test_ten_thousand_mutated_tars() -> None:
    report = campaign(10_000, seed=20, time_limit=5.0)
    assert report.inputs == 10_000
    failures = {kind: report.examples.get(kind, []) for kind in ("exceptions", "hangs", "escapes", "mismatches")
                if report.counts[kind]}
    assert not failures, "\n".join(report.lines())
    # the mutations reach both sides: some inputs are applied, some refused by each
    assert report.counts["applied"] > 1000 and report.counts["refused_by_check"] > 1000
    assert report.counts["refused_by_unpacker"] > 0
