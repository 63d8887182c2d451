"""The least traffic the exposure design allows: what `bytes_per_epoch` is held against."""

ROW_NUMBER_BYTES = 4  # a batch row travels as one int32


def minimum_step_bytes(batch: int, sizes: tuple, workers: int, itemsize: int, second_layer_here: bool) -> int:
    """Payload bytes one training step of `batch` rows must move between the coordinator and its workers.

    With B rows, I inputs, H hidden units, O outputs, N workers and s bytes per number (K_w, J_w: worker
    w's input columns and hidden units, which partition I and H):

        2 I H s     W1 rows K_w out (shuffled), dW1 rows K_w back
        2 N B H s   d1 out to every worker (it multiplies all H columns), a z1 partial back from each
        4 N B       the batch's row numbers, int32, to every worker (its pixels are cached there)
      and, unless the coordinator computes the second layer itself:
        2 B H s     a1[:, J_w] out, e1[:, J_w] back
        2 H O s     W2 rows J_w out, dW2 rows J_w back
        2 N B O s   d2 out to every worker, a z2 partial back from each

    Input shards are sent once per run and are not part of an epoch; nor is message framing.
    """
    inputs, hidden, outputs = sizes
    numbers = 2 * inputs * hidden + 2 * workers * batch * hidden
    if not second_layer_here:
        numbers += 2 * batch * hidden + 2 * hidden * outputs + 2 * workers * batch * outputs
    return numbers * itemsize + ROW_NUMBER_BYTES * workers * batch


def minimum_epoch_bytes(rows: int, batch_size: int, sizes: tuple, workers: int, itemsize: int,
                        second_layer_here: bool) -> int:
    """The sum of `minimum_step_bytes` over an epoch's batches, the last one possibly short."""
    full, rest = divmod(rows, batch_size)
    step = lambda batch: minimum_step_bytes(batch, sizes, workers, itemsize, second_layer_here)  # noqa: E731
    return full * step(batch_size) + (step(rest) if rest else 0)
