"""Static files storage: WhiteNoise's compressed, hashed files once `collectstatic` has run, the
apps' own files by their own names until then.

After `collectstatic` (a deploy's build step) pages link to hashed names (`base.5af66c1b1797.css`)
that WhiteNoise serves from STATIC_ROOT compressed and cacheable forever. Without it there is no
manifest, and Django's manifest storage would fail every page that links a static file when DEBUG
is off; this one links the plain names instead, which WhiteNoise serves from the apps' static
folders (WHITENOISE_USE_FINDERS), so `runserver` shows a styled admin with no build step.
"""
from whitenoise.storage import CompressedManifestStaticFilesStorage


class CompressedManifestOrAppStaticStorage(CompressedManifestStaticFilesStorage):
    def stored_name(self, name):
        if not self.hashed_files:  # no staticfiles.json in STATIC_ROOT: nothing was collected
            return name
        return super().stored_name(name)
