"""The DICOM node behind `python -m ich.serve`: studies arrive by C-STORE, answers go back into the same study.

One module per job: `spool` keeps every acknowledged file on disk and what became of each study, `receive` is
the network side (C-ECHO, C-STORE, who may associate), `dicom_results` builds the SR and Secondary Capture
answer with highdicom, `forward` sends answers on by C-STORE and retries, and `node` ties them together: a
study is answered once no file of it has arrived for a quiet period, by one worker and one loaded model.
"""
