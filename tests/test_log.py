"""One log for every entry point: levels, owner tags, library warnings shown once."""

import io
import logging
import warnings

from fedmem.log import log_context, progress, setup_logging


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_levels_tags_and_warnings():
    out = io.StringIO()
    setup_logging(0, stream=out)
    log = logging.getLogger("fedmem.test")
    log.debug("hidden detail")
    log.info("round 1/3: training")
    with log_context("alpha round 1"):
        log.info("epoch 1/3 loss 1.000")
    log.warning("a client failed")
    for _ in range(3):
        warnings.warn("old API", FutureWarning, stacklevel=1)
    lines = _lines(out)
    assert lines[:3] == ["round 1/3: training", "[alpha round 1] epoch 1/3 loss 1.000", "warning: a client failed"]
    assert sum("FutureWarning: old API" in line for line in lines) == 1  # shown, once

    quiet = io.StringIO()
    setup_logging(-1, stream=quiet, prefix="[fedmem] ")
    log.info("not shown under -q")
    log.warning("shown")
    assert _lines(quiet) == ["[fedmem] warning: shown"]
    assert "not shown" not in out.getvalue()  # the earlier handler was replaced, not kept beside

    verbose = io.StringIO()
    setup_logging(1, stream=verbose)
    log.debug("detail")
    assert _lines(verbose) == ["debug: detail"]
    setup_logging(0)


def test_progress_is_a_plain_iterator_off_a_terminal(capsys):
    setup_logging(0)
    assert list(progress(range(3), desc="x")) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # no bar drawn into a pipe or a CI log
