"""TFDS/grain input pipelines; importing this registers the offline `mmtl_shapes` builder."""
from mmtl.data import shapes  # Registers the TFDS builder `mmtl_shapes`.
from mmtl.data.pipeline import (
    builder,
    class_names,
    data_source,
    defaults,
    eval_num_batches,
    input_config,
    make_eval_iterator,
    make_train_iterator,
    num_examples,
)
