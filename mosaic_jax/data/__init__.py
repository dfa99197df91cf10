"""The data layer: band selection and normalisation, on-device augmentation, the Grain input
pipeline and the demo datasets."""
