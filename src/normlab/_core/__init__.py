"""The floor of normlab: torch only, imports nothing else from normlab.

Statistics with one variance rule and the reductions of the fused Functions
(:mod:`.stats`), Switchable Norm's mixing of moments (:mod:`.mixing`),
normalize/affine helpers (:mod:`.normalize`), running-statistic updates
(:mod:`.running`), argument checks (:mod:`.checks`), the collectives of synchronized
layers and the cross-process merge (:mod:`.collectives`), the export-safe primitives
(:mod:`.export`), what the fused CPU Functions share (:mod:`.fused`) and the one
decision of which implementation runs an op (:mod:`.dispatch`). Every other package
of normlab builds on these.
"""
