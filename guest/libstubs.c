/*
 * Tiny stand-ins for two shared libraries that pciutils' lspci links against
 * but cannot use in the pych test guest.  guest/build.sh compiles this file
 * twice (-DSTUB_LIBKMOD -> libkmod.so.2, -DSTUB_LIBUDEV -> libudev.so.1) with
 * version scripts that provide the symbol versions lspci/libpci require.
 *
 * Why: the real libkmod pulls in libcrypto, libzstd and liblzma (~5.7 MB) and
 * the guest unpacks its initramfs at ~2.5 s per MiB.  The guest kernel has no
 * modules (CONFIG_MODULES=n) and no udev hwdb, so both libraries could only
 * ever answer "nothing" there; these stubs answer exactly that:
 *   - libkmod: a context that finds no module for any alias, so `lspci -k`
 *     prints "Kernel driver in use:" (from sysfs) and no "Kernel modules:";
 *   - libudev: no udev context, so libpci falls back to pci.ids for names.
 */
#include <stddef.h>

#ifdef STUB_LIBKMOD
struct kmod_ctx;
struct kmod_list;
struct kmod_module;

static char stub_ctx;

struct kmod_ctx *kmod_new(const char *dirname, const char *const *config_paths)
{
	(void)dirname;
	(void)config_paths;
	return (struct kmod_ctx *)&stub_ctx;
}

struct kmod_ctx *kmod_unref(struct kmod_ctx *ctx)
{
	(void)ctx;
	return NULL;
}

int kmod_load_resources(struct kmod_ctx *ctx)
{
	(void)ctx;
	return 0;
}

int kmod_module_new_from_lookup(struct kmod_ctx *ctx, const char *given_alias,
				struct kmod_list **list)
{
	(void)ctx;
	(void)given_alias;
	if (list)
		*list = NULL;
	return 0;
}

struct kmod_list *kmod_list_next(const struct kmod_list *list,
				 const struct kmod_list *curr)
{
	(void)list;
	(void)curr;
	return NULL;
}

struct kmod_module *kmod_module_get_module(const struct kmod_list *entry)
{
	(void)entry;
	return NULL;
}

const char *kmod_module_get_name(const struct kmod_module *mod)
{
	(void)mod;
	return NULL;
}

struct kmod_module *kmod_module_unref(struct kmod_module *mod)
{
	(void)mod;
	return NULL;
}

int kmod_module_unref_list(struct kmod_list *list)
{
	(void)list;
	return 0;
}
#endif /* STUB_LIBKMOD */

#ifdef STUB_LIBUDEV
struct udev;
struct udev_hwdb;
struct udev_list_entry;

struct udev *udev_new(void)
{
	return NULL;
}

struct udev *udev_unref(struct udev *udev)
{
	(void)udev;
	return NULL;
}

struct udev_hwdb *udev_hwdb_new(struct udev *udev)
{
	(void)udev;
	return NULL;
}

struct udev_hwdb *udev_hwdb_unref(struct udev_hwdb *hwdb)
{
	(void)hwdb;
	return NULL;
}

struct udev_list_entry *udev_hwdb_get_properties_list_entry(struct udev_hwdb *hwdb,
							    const char *modalias,
							    unsigned int flags)
{
	(void)hwdb;
	(void)modalias;
	(void)flags;
	return NULL;
}

struct udev_list_entry *udev_list_entry_get_next(struct udev_list_entry *entry)
{
	(void)entry;
	return NULL;
}

const char *udev_list_entry_get_name(struct udev_list_entry *entry)
{
	(void)entry;
	return NULL;
}

const char *udev_list_entry_get_value(struct udev_list_entry *entry)
{
	(void)entry;
	return NULL;
}
#endif /* STUB_LIBUDEV */
