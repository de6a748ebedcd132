"""The floor of normlab: torch only, imports nothing else from normlab.

Statistics with one variance rule (:mod:`.stats`), normalize/affine helpers
(:mod:`.normalize`), running-statistic updates (:mod:`.running`), argument checks
(:mod:`.checks`), the collectives of synchronized layers (:mod:`.collectives`), the
export-safe primitives (:mod:`.export`) and the one decision of which implementation
runs an op (:mod:`.dispatch`). Every other package of normlab builds on these.
"""
