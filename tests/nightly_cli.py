"""`pni-ray nightly` run in-process as the console script runs it (its exit status), for the nightly tests."""

from __future__ import annotations

from pni_ray.cli import main as cli_main


def run_nightly(args: list[str]) -> int:
    """`pni-ray nightly -q ARGS`; its exit status."""
    try:
        returned = cli_main.main(["nightly", "-q", *args], standalone_mode=False)
    except SystemExit as exc:
        return exc.code
    if isinstance(returned, int):  # click's ctx.exit(N) (an eager flag such as --example-config): the script exits N
        return returned
    raise AssertionError("pni-ray nightly returned without an exit status")
