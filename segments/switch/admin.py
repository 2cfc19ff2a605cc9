"""Admin pages for the backfill's bookkeeping: the quarantine (with a "retry" action) and the
claims of the workers running now."""
from django.contrib import admin, messages

from segments.models import BackfillClaim, QuarantinedSegment


class ReadOnlyAdmin(admin.ModelAdmin):
    """A page that shows what the switch's own code writes: nothing to add, change or delete."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(QuarantinedSegment)
class QuarantinedSegmentAdmin(admin.ModelAdmin):
    list_display = ("segment_id", "attempts", "reason", "first_failed_at", "last_failed_at")
    search_fields = ("=segment_id", "reason")
    ordering = ("-last_failed_at",)
    readonly_fields = ("segment_id", "text_md5", "reason", "attempts", "first_failed_at", "last_failed_at")
    actions = ("retry",)

    def has_add_permission(self, request):
        return False  # entries are written by the backfill only

    def has_change_permission(self, request, obj=None):
        return False

    @admin.action(description="Retry: release the selected segments for the next backfill", permissions=["delete"])
    def retry(self, request, queryset):
        released, _ = queryset.delete()
        self.message_user(
            request,
            f"Released {released} quarantined segment(s): `manage.py backfill_embeddings` will try them again.",
            messages.SUCCESS,
        )


@admin.register(BackfillClaim)
class BackfillClaimAdmin(ReadOnlyAdmin):
    """Read-only: the id ranges backfill workers hold now (a dead worker's claim is taken over)."""

    list_display = ("first_id", "last_id", "worker_name", "worker_pid", "claimed_at")
    ordering = ("first_id",)
