"""``python -m agvm_ds.data ROOT``: generate (or reuse) the synthetic COCO set under ROOT."""
from .synthetic import main

main()
