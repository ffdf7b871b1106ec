"""Reading ahead: :func:`prefetch` runs an iterator in a background thread,
a bounded number of items ahead of its consumer, so that decoding the next
store batch (HDF5 reads and decompression) overlaps the work on the
current one.

Neighbours: :meth:`~.reader.TangentStore.iter_batches` (``prefetch=k``)
wraps its batches in it; the GradNet sources (:mod:`gradnet_cupy.gradnet.
sources`) ask for it when training and evaluating.
"""
import queue
import threading

from gradnet_cupy.errors import GradnetError

_POLL_SECONDS = 0.05


def prefetch(items, depth):
    """Yield the items of the iterable ``items`` in their order, computed by
    one background thread at most ``depth`` (>= 1) items ahead.

    An exception raised by ``items`` is raised here, at the item where it
    happened (after the items before it). Closing this generator early (a
    ``break`` in the consumer, an exception, garbage collection) stops the
    thread and waits for it, so nothing reads the source afterwards.
    """
    if int(depth) != depth or depth < 1:
        raise GradnetError(f'prefetch depth must be a positive integer, got '
                           f'{depth!r}')
    ahead = queue.Queue(int(depth))
    stop = threading.Event()
    source = iter(items)

    def put(entry):
        while not stop.is_set():
            try:
                ahead.put(entry, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in source:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as error:   # handed to the consumer
            put((False, error))

    thread = threading.Thread(target=work, name='gradnet-prefetch',
                              daemon=True)
    thread.start()
    try:
        while True:
            more, value = ahead.get()
            if more:
                yield value
            elif value is None:
                return
            else:
                raise value
    finally:
        stop.set()
        thread.join()
        close = getattr(source, 'close', None)
        if close is not None:
            close()
