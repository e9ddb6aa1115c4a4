"""The parts of ``mtkd serve`` (the protocol is in :mod:`mtkd.cli.serve`): the request and
reply channel, the output relay, one job, and the loop that runs jobs one at a time."""
