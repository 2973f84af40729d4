"""Files to model input: decoding (images, DICOM), input discovery, shards, labelled folders and the split."""
