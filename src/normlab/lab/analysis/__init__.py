"""From numbers to answers: small-sample t-tests (``ttests``), power and sample size
(``power``), ``normlab compare`` (``compare``, ``compare_io``), the sweep report (``report``,
with ``cells``, ``report_seg`` for segmentation and ``report_models`` for a user's model).
"""
