"""TFDS dataset builders for BigEarthNet v2.0 and SEN12MS (read without TensorFlow)."""
