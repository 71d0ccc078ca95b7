"""Air-gapped sites: every exchange of a sync, also by signed files carried in and out.

:mod:`.bundle` is the file format; the node imports bundles for its site
(:mod:`.inbound`) and writes its own bundle back (:mod:`.outbound`); the
control plane's side is :mod:`sites.bundles`.
"""
