"""Result objects sent to PACS, shared by the workstation and the batch scorer.

``sr``: the TID 1500 Comprehensive 3D SR per decided study; ``sc``: the heatmap
Secondary Capture per scored image; ``send``: destinations (DIMSE ``AE@HOST:PORT``,
DICOMweb STOW-RS URLs) and delivery.
"""
