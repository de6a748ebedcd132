"""What a lab run learns: the :class:`~normlab.lab.tasks.task.Task` protocol and classification
(``task``), segmentation (``segmentation``) and its metrics (``seg_metrics``).
"""
