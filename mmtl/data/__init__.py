"""TFDS/grain input pipelines; importing this registers the offline builders `mmtl_shapes`,
`mmtl_spoken_digits` and `mmtl_bounces`.

options: the `config.input` keys; source: the dataset; transforms: per-example and per-batch
preprocessing; loader: the (grain) iterators; tf_loader: the tf.data fallback; device: batches
onto the mesh.
"""

from mmtl.data import bounces, shapes, spoken_digits  # Register the TFDS builders.
from mmtl.data.loader import Features, eval_num_batches, make_eval_iterator, make_train_iterator
from mmtl.data.options import defaults, input_config
from mmtl.data.source import builder, class_names, data_source, num_examples
