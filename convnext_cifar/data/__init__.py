"""From files to the batches the model receives: the dataset kinds, the decode cache, where the
images live, the batched augmentation and the loader."""
