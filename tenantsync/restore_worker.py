"""A restore worker process: decodes the ranges restore_pool sends, until its input ends.

Messages both ways are length-prefixed pickles (FRAME): a RangeJob in, then
``(True, RangeSum)`` or ``(False, exception)`` out. Only the parent writes to this process's
input, so unpickling it trusts no one else.
"""

from __future__ import annotations

import dataclasses
import pickle
import struct
import sys

from tenantsync.ltx.ranges import RangeJob, decode_range, exactly
from tenantsync.storage.file import FileStorage

FRAME = struct.Struct(">Q")  # length prefix of every message


def read_message(stream):
    """One length-prefixed pickle; EOFError if the other side has gone."""
    head = stream.read(FRAME.size)
    if len(head) < FRAME.size:
        raise EOFError("restore worker pipe closed")
    (length,) = FRAME.unpack(head)
    body = stream.read(length)
    if len(body) < length:
        raise EOFError("restore worker pipe closed")
    return pickle.loads(body)


def _reply(out, message) -> None:
    try:
        body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # an exception that does not pickle still reaches the parent
        body = pickle.dumps((False, RuntimeError(f"{message[1]!r} ({e})")))
    out.write(FRAME.pack(len(body)))
    out.write(body)
    out.flush()


def _with_data(job: RangeJob) -> RangeJob:
    """The job with its bytes: read here from a ``file://`` replica (``job.source``), which
    spares the parent reading them and both sides copying them through the pipe, CPU the
    decoding needs on a small machine."""
    if job.source is None:
        return job
    root, key = job.source
    length = job.end - job.start
    data = exactly(job.name, FileStorage(root).read(key, job.start, length), job.start, length)
    return dataclasses.replace(job, data=data, source=None)


def main() -> None:
    source, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            job = read_message(source)
        except EOFError:
            return
        try:
            reply = (True, decode_range(_with_data(job)))
        except Exception as e:  # the parent raises it in the restore that sent the job
            reply = (False, e)
        _reply(out, reply)


if __name__ == "__main__":
    main()
