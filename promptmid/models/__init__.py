"""Neural network parts of the pipeline: keypoints, feature sources, aggregation, weights."""
