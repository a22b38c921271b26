"""When another arithmetic of a network counts as the same network: the bar an int8 file
passes to be written (`segserve quantize`) and every variant passes again, on the machine
that would serve it, before it serves (service/runtime/selection.py).

Measured against the float32 network's own labels on the same images: the share of pixels
whose label is unchanged, and the mean IU each scores against the truth. Classes under a
floor are the check set's (the card's `class_floor`, else the server's setting).
"""

MIN_AGREEMENT = 0.995  # of pixels keep their float32 label
MAX_MEAN_IU_DROP = 0.005  # under float32's mean IU, at most
