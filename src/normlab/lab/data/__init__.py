"""The lab's data: the embedded Animal-MNIST images and the user's own (``images``), the
built-in silhouette scenes (``scenes``) and a user's folder of images and masks
(``seg_folder``) for segmentation, and the one way every process prepares a split's tensors
(``prepare``). The embedded set ships in ``datasets/``.
"""
