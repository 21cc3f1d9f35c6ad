"""What a run leaves for people: the report's figures, QC montages and table pages, the workbook, provenance.

One module per item, in the order the report shows them: :mod:`figures`
(waterfall, spaghetti, category counts), :mod:`pages` (the response tables as
HTML), :mod:`montage` (QC montages, also shown to blinded readers),
:mod:`workbook` (one .xlsx of every table) and :mod:`provenance` (software,
config, inputs and checksums). Importing this package loads none of them.
"""
