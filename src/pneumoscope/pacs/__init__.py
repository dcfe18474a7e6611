"""pneumoscope in a hospital's DICOM workflow (docs/pacs.md).

- `accept`: what is read (chest radiographs: CR and DX for presentation, frontal views) and the
  DICOM status each refusal answers;
- `report`: the read as DICOM: a TID 1500 Structured Report (highdicom) and, on request, a
  Secondary Capture with the Grad-CAM heat map burned in;
- `destinations`: where results go (C-STORE to an AE, or STOW-RS to a DICOMweb service);
- `node`: `pneumoscope listen`, a C-STORE SCP (pynetdicom) with a crash-safe spool;
- `dicomweb`: `pneumoscope pacs --dicomweb URL`, QIDO-RS/WADO-RS/STOW-RS with a resumable state file.

Nothing here is imported by `pneumoscope --help`: cli.py imports these modules in the commands.
"""
