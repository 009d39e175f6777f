/*
 * pych's fuzz guest: a freestanding 32-bit PVH kernel (no paging) that attacks the VMM's
 * device models as a hostile guest would, in scenarios the host checks between.
 *
 * Command line (from the PVH start info): seed=N scenarios=N rounds=N ram=BYTES
 * ecam=ADDR hp=ADDR (the platform block: GED, CPU, memory and PCI hot plug registers).
 *
 * Each scenario prints "FUZZ-SCENARIO <n> <kind> seed=<seed> done" on COM1 and then waits
 * for one byte on COM1 from the host (which checks pych meanwhile).  At the end it prints
 * "FUZZ-GUEST-DONE" and powers off through the ACPI sleep register.
 *
 * Memory it uses: its image at 1 MiB, virtqueue rings at 16..32 MiB, buffers at 32..48 MiB.
 * Descriptors it writes may point anywhere except its own image (below 16 MiB).  What would
 * stop its own vCPU rather than test the VMM is left out: MSI-X entries asking for INIT,
 * SMI or NMI delivery, the ACPI sleep/reset register, 0xCF9 and the i8042 reset command.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define RINGS     0x1000000u
#define POOL      0x2000000u
#define POOL_SIZE 0x1000000u
#define BAR_WINDOW 0xC0000000u
#define BAR_WINDOW_END 0xE8000000u
#define SLEEP_PORT 0x600
#define I8042_CMD 0x64

void *memset(void *d, int c, unsigned n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }
void *memcpy(void *d, const void *s, unsigned n)
{ u8 *p = d; const u8 *q = s; while (n--) *p++ = *q++; return d; }

static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(p)); }
static inline void outw(u16 p, u16 v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(p)); }
static inline void outl(u16 p, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u16 inw(u16 p) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u32 inl(u16 p) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }

static inline u32 rd(u32 a, int w)
{
	switch (w) {
	case 1: return *(volatile u8 *)a;
	case 2: return *(volatile u16 *)a;
	default: return *(volatile u32 *)a;
	}
}
static inline void wr(u32 a, int w, u32 v)
{
	switch (w) {
	case 1: *(volatile u8 *)a = (u8)v; break;
	case 2: *(volatile u16 *)a = (u16)v; break;
	default: *(volatile u32 *)a = v; break;
	}
}
static inline void wr64(u32 a, u64 v) { wr(a, 4, (u32)v); wr(a + 4, 4, (u32)(v >> 32)); }

/* --- serial -------------------------------------------------------------------------- */
static void uart_sane(void)
{
	outb(0x3fb, 0x03);        /* 8N1, DLAB off */
	outb(0x3f9, 0x00);        /* no interrupts */
	outb(0x3fc, 0x03);        /* DTR|RTS, no loopback */
}
static void putc(char c) { outb(0x3f8, (u8)c); }
static void puts(const char *s) { while (*s) putc(*s++); }
static void putdec(u32 v)
{
	char b[12]; int i = 0;
	do { b[i++] = (char)('0' + v % 10); v /= 10; } while (v);
	while (i) putc(b[--i]);
}
static void puthex(u32 v)
{
	puts("0x");
	for (int i = 28; i >= 0; i -= 4) putc("0123456789abcdef"[(v >> i) & 15]);
}
static void wait_host(void)
{
	while (!(inb(0x3fd) & 1))
		__asm__ volatile("pause");
	(void)inb(0x3f8);
}

/* --- randomness ---------------------------------------------------------------------- */
static u32 rs;
static u32 rnd(void) { rs ^= rs << 13; rs ^= rs >> 17; rs ^= rs << 5; return rs; }
static u32 below(u32 n) { return n ? rnd() % n : 0; }
static int chance(u32 pct) { return below(100) < pct; }
static int width(void) { static const int w[] = {1, 2, 4}; return w[below(3)]; }
static u32 value(void)
{
	switch (below(6)) {
	case 0: return 0;
	case 1: return 0xffffffffu;
	case 2: return 1u << below(32);
	case 3: return below(256);
	default: return rnd();
	}
}

/* --- command line -------------------------------------------------------------------- */
static u32 seed = 1, scenarios = 12, rounds = 40, ram = 256u << 20;
static u32 ecam = 0xE8000000u, hp = 0xFEB00000u;

static u32 parse_num(const char *s)
{
	u32 v = 0, base = 10;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) { base = 16; s += 2; }
	for (;; s++) {
		u32 d;
		if (*s >= '0' && *s <= '9') d = (u32)(*s - '0');
		else if (base == 16 && *s >= 'a' && *s <= 'f') d = (u32)(*s - 'a' + 10);
		else if (base == 16 && *s >= 'A' && *s <= 'F') d = (u32)(*s - 'A' + 10);
		else break;
		v = v * base + d;
	}
	return v;
}
static int prefix(const char *s, const char *p) { while (*p) if (*s++ != *p++) return 0; return 1; }
static void parse_cmdline(const char *c)
{
	while (c && *c) {
		while (*c == ' ') c++;
		if (prefix(c, "seed=")) seed = parse_num(c + 5);
		else if (prefix(c, "scenarios=")) scenarios = parse_num(c + 10);
		else if (prefix(c, "rounds=")) rounds = parse_num(c + 7);
		else if (prefix(c, "ram=")) ram = parse_num(c + 4);
		else if (prefix(c, "ecam=")) ecam = parse_num(c + 5);
		else if (prefix(c, "hp=")) hp = parse_num(c + 3);
		while (*c && *c != ' ') c++;
	}
}

/* --- PCI ----------------------------------------------------------------------------- */
static u32 cfg_addr(int dev, u32 off) { return ecam + ((u32)dev << 15) + off; }
static u32 cfg_rd(int dev, u32 off, int w) { return rd(cfg_addr(dev, off), w); }
static void cfg_wr(int dev, u32 off, int w, u32 v) { wr(cfg_addr(dev, off), w, v); }

struct vdev {
	int dev;
	u16 id;
	u32 bar[6], bar_size[6];
	u32 common, notify, notify_mult, isr, devcfg, devcfg_len, pcicfg_cap;
	u32 msix_table, msix_entries, msix_pba, msix_cap;
	u16 num_queues;
};
static struct vdev devs[32];
static int ndevs;
static u32 next_bar;

static u32 cap_addr(struct vdev *d, u32 cap)
{
	u32 bar = cfg_rd(d->dev, cap + 4, 1), off = cfg_rd(d->dev, cap + 8, 4);
	return bar < 6 && d->bar[bar] ? d->bar[bar] + off : 0;
}

/* Enumerate bus 0 through ECAM; move every memory BAR into the 32-bit window (this guest
 * cannot reach the 64-bit one) and enable decoding and bus mastering. */
static void enumerate(void)
{
	ndevs = 0;
	next_bar = BAR_WINDOW;
	for (int dev = 0; dev < 32; dev++) {
		u32 id = cfg_rd(dev, 0, 4);
		if (id == 0xffffffffu || id == 0)
			continue;
		struct vdev *d = &devs[ndevs];
		memset(d, 0, sizeof(*d));
		d->dev = dev;
		d->id = (u16)(id >> 16);
		cfg_wr(dev, 4, 2, 0);                       /* decoding off while BARs move */
		for (int b = 0; b < 6; b++) {
			u32 off = 0x10 + 4 * (u32)b, orig = cfg_rd(dev, off, 4);
			if (orig & 1)
				continue;                            /* I/O BAR: none expected */
			int is64 = ((orig >> 1) & 3) == 2;
			cfg_wr(dev, off, 4, 0xffffffffu);
			u32 mask = cfg_rd(dev, off, 4) & ~0xfu;
			if (is64)
				cfg_wr(dev, off + 4, 4, 0xffffffffu);
			if (mask) {
				u32 size = ~mask + 1;
				u32 base = (next_bar + size - 1) & ~(size - 1);
				if (base >= next_bar && base + size <= BAR_WINDOW_END && base + size > base) {
					cfg_wr(dev, off, 4, base);
					if (is64) cfg_wr(dev, off + 4, 4, 0);
					d->bar[b] = base;
					d->bar_size[b] = size;
					next_bar = base + size;
				}
			}
			if (is64) b++;
		}
		cfg_wr(dev, 4, 2, 0x6);                     /* memory decoding, bus master */
		if (d->id >= 0x1040 && (id & 0xffff) == 0x1af4) {
			u32 cap = cfg_rd(dev, 0x34, 1) & 0xfc;
			for (int guard = 0; cap && guard < 48; guard++) {
				u8 type = (u8)cfg_rd(dev, cap, 1);
				if (type == 0x09) {
					u8 vt = (u8)cfg_rd(dev, cap + 3, 1);
					u32 a = cap_addr(d, cap);
					if (vt == 1) d->common = a;
					else if (vt == 2) { d->notify = a; d->notify_mult = cfg_rd(dev, cap + 16, 4); }
					else if (vt == 3) d->isr = a;
					else if (vt == 4) { d->devcfg = a; d->devcfg_len = cfg_rd(dev, cap + 12, 4); }
					else if (vt == 5) d->pcicfg_cap = cap;
				} else if (type == 0x11) {
					u32 t = cfg_rd(dev, cap + 4, 4), p = cfg_rd(dev, cap + 8, 4);
					d->msix_cap = cap;
					d->msix_entries = (cfg_rd(dev, cap + 2, 2) & 0x7ff) + 1;
					if ((t & 7) < 6 && d->bar[t & 7]) d->msix_table = d->bar[t & 7] + (t & ~7u);
					if ((p & 7) < 6 && d->bar[p & 7]) d->msix_pba = d->bar[p & 7] + (p & ~7u);
				}
				cap = cfg_rd(dev, cap + 1, 1) & 0xfc;
			}
			if (d->common) d->num_queues = (u16)rd(d->common + 0x12, 2);
		}
		ndevs++;
	}
}

/* --- virtqueues ---------------------------------------------------------------------- */
#define VQ_DESC(q)  ((q)->ring)
#define VQ_AVAIL(q) ((q)->ring + 0x4000)
#define VQ_USED(q)  ((q)->ring + 0x8000)
#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4

struct vq { u32 ring; u16 size, idx; u32 notify; u16 index; };

static u64 hostile_addr(void)
{
	switch (below(12)) {
	case 0: return 0xfffffffffffff000ull;
	case 1: return (u64)ram - 8;                          /* straddles the end of RAM */
	case 2: return 0xF0000000ull;                        /* in the hole, no device */
	case 3: return 0x100000000000ull + rnd();
	case 4: return RINGS + below(0x400000);              /* its own rings */
	case 5: return ram;                                  /* the first byte past RAM */
	default: return POOL + (below(POOL_SIZE) & ~15u);
	}
}
static u32 hostile_len(void)
{
	switch (below(10)) {
	case 0: return 0;
	case 1: return 0xffffffffu;
	case 2: return below(1u << 24);
	case 3: return 0x80000000u;
	default: return 1 + below(4096);
	}
}
static void desc_set(u32 table, u32 i, u64 addr, u32 len, u16 flags, u16 next)
{
	u32 d = table + 16 * i;
	wr64(d, addr); wr(d + 8, 4, len); wr(d + 12, 2, flags); wr(d + 14, 2, next);
}
static void buf_fill(u32 addr, u32 len)
{
	/* words that look like page frame numbers of the buffer pool, or far out of RAM
	 * (a balloon inflating them must not discard this guest's own pages) */
	if (len > 512) len = 512;
	for (u32 i = 0; i + 4 <= len; i += 4)
		wr(addr + i, 4, chance(70) ? (POOL >> 12) + below(POOL_SIZE >> 12) : rnd() | 0x80000000u);
}
static void avail_push(struct vq *q, u16 head)
{
	u32 a = VQ_AVAIL(q);
	wr(a + 4 + 2 * (q->idx % (q->size ? q->size : 1)), 2, head);
	q->idx++;
	wr(a + 2, 2, q->idx);
}
static void kick(struct vq *q)
{
	if (q->notify) wr(q->notify, 2, q->index);
}
static void settle(struct vq *q)
{
	u16 start = (u16)rd(VQ_USED(q) + 2, 2);
	for (int i = 0; i < 3000; i++) {
		if ((u16)rd(VQ_USED(q) + 2, 2) != start) break;
		__asm__ volatile("pause");
	}
}

static struct vq queues[4];
static int nq;

/* Reset, negotiate a random subset of features (always VERSION_1), set up to 4 queues. */
static void vdev_init(struct vdev *d, int slot)
{
	u32 c = d->common;
	wr(c + 0x14, 1, 0);
	for (int i = 0; i < 1000 && rd(c + 0x14, 1); i++) ;
	wr(c + 0x14, 1, 1); wr(c + 0x14, 1, 3);
	wr(c, 4, 0); u32 f0 = rd(c + 4, 4);
	wr(c, 4, 1); u32 f1 = rd(c + 4, 4);
	wr(c + 8, 4, 0); wr(c + 0xc, 4, f0 & rnd());
	wr(c + 8, 4, 1); wr(c + 0xc, 4, (f1 & rnd()) | 1);
	wr(c + 0x14, 1, 0xb);
	nq = d->num_queues < 4 ? d->num_queues : 4;
	for (int i = 0; i < nq; i++) {
		struct vq *q = &queues[i];
		q->ring = RINGS + ((u32)slot * 4 + (u32)i) * 0x10000u;
		q->index = (u16)i;
		q->idx = 0;
		wr(c + 0x16, 2, (u32)i);
		u16 max = (u16)rd(c + 0x18, 2), size = 256;
		while (size > max && size) size >>= 1;
		if (chance(5)) size = (u16)rnd();                 /* not a power of two, or too big */
		if (size > 1024) size = 1024;
		q->size = size;
		wr(c + 0x18, 2, size);
		for (u32 k = 0; k < 8; k++) { wr(VQ_AVAIL(q) + 4 * k, 4, 0); wr(VQ_USED(q) + 4 * k, 4, 0); }
		wr64(c + 0x20, chance(3) ? hostile_addr() : VQ_DESC(q));
		wr64(c + 0x28, chance(3) ? hostile_addr() : VQ_AVAIL(q));
		wr64(c + 0x30, chance(3) ? hostile_addr() : VQ_USED(q));
		if (d->msix_entries) wr(c + 0x1a, 2, below(d->msix_entries + 1));
		u32 off = rd(c + 0x1e, 2);
		q->notify = d->notify ? d->notify + off * d->notify_mult : 0;
		wr(c + 0x1c, 2, 1);
	}
	wr(c + 0x14, 1, 0xf);
}

/* A random chain of 1..8 descriptors, each hostile in some way, at a random head. */
static u16 random_chain(struct vq *q)
{
	if (!q->size) return 0;
	u16 head = (u16)below(q->size), i = head;
	int n = 1 + (int)below(8);
	for (int k = 0; k < n; k++) {
		u16 next = chance(90) ? (u16)((i + 1) % q->size) : (u16)rnd();
		u16 flags = (u16)((k + 1 < n ? F_NEXT : 0) | (chance(50) ? F_WRITE : 0) |
				  (chance(5) ? F_INDIRECT : 0));
		u64 addr = chance(80) ? POOL + (below(POOL_SIZE - 0x10000) & ~15u) : hostile_addr();
		u32 len = chance(80) ? 1 + below(4096) : hostile_len();
		if (addr >= POOL && addr < POOL + POOL_SIZE) buf_fill((u32)addr, len);
		desc_set(VQ_DESC(q), i, addr, len, flags, next);
		i = next % q->size;
	}
	return head;
}

/* A chain the device will find plausible: a 16-byte header then data (blk's shape). */
static u16 plausible_chain(struct vq *q, int blk)
{
	if (q->size < 4) return 0;
	u16 head = (u16)below(q->size - 3);
	u32 hdr = POOL + (below(POOL_SIZE - 0x20000) & ~0xfffu), data = hdr + 0x1000;
	if (blk) {
		static const u32 types[] = {0, 1, 4, 8, 11, 13, 0x7fffffff};
		wr(hdr, 4, types[below(7)]);
		wr(hdr + 4, 4, 0);
		u64 sector = chance(20) ? (1ull << 63) | rnd() : below(2048);
		wr64(hdr + 8, sector);
	} else {
		buf_fill(hdr, 64);
	}
	u32 len = chance(80) ? 512u * (1 + below(8)) : hostile_len();
	desc_set(VQ_DESC(q), head, hdr, blk ? 16 : 64, F_NEXT, (u16)(head + 1));
	desc_set(VQ_DESC(q), (u16)(head + 1), data, len, (u16)(F_NEXT | (chance(50) ? F_WRITE : 0)),
		 (u16)(head + 2));
	desc_set(VQ_DESC(q), (u16)(head + 2), data + 0x8000, 1, F_WRITE, 0);
	return head;
}

static void indirect_chain(struct vq *q)
{
	if (!q->size) return;
	u16 head = (u16)below(q->size);
	u32 table = POOL + (below(POOL_SIZE - 0x200000) & ~0xfffu);
	u32 n = chance(50) ? 1 + below(64) : below(100000);
	u32 len = chance(80) ? n * 16 : hostile_len();
	u32 fill = n < 64 ? n : 64;
	for (u32 k = 0; k < fill; k++) {
		u16 flags = (u16)((chance(80) ? F_NEXT : 0) | (chance(50) ? F_WRITE : 0) |
				  (chance(10) ? F_INDIRECT : 0));
		u16 next = chance(30) ? (u16)k : (u16)((k + 1) % (n ? n : 1));   /* loops too */
		desc_set(table, k, chance(80) ? table + 0x1000 * (1 + k % 16) : hostile_addr(),
			 chance(80) ? 1 + below(4096) : hostile_len(), flags, next);
	}
	if (n > fill && len >= 16 * fill + 16) {       /* a self-looping tail across the table */
		u32 last = n - 1;
		if (table + 16 * last + 16 <= POOL + POOL_SIZE)
			desc_set(table, last, table, 16, F_NEXT, (u16)last);
	}
	desc_set(VQ_DESC(q), head, table, len, (u16)(F_INDIRECT | (chance(10) ? F_NEXT : 0)),
		 (u16)below(q->size));
	avail_push(q, head);
}

static void msix_fuzz(struct vdev *d)
{
	if (d->msix_table && d->msix_entries) {
		u32 e = d->msix_table + 16 * below(d->msix_entries + 2);
		switch (below(3)) {
		case 0: wr(e, 4, 0xFEE00000u | (below(4) << 12)); wr(e + 4, 4, 0);
			wr(e + 8, 4, 0x30 + below(200)); wr(e + 12, 4, chance(50)); break;
		case 1: {                 /* never INIT/SMI/NMI delivery: that stops the vCPU */
			u32 off = 4 * below(4);
			wr(e + off, 4, off == 8 ? below(256) : value());
			break;
		}
		default: (void)rd(e + below(16), width());
		}
	}
	if (d->msix_pba) (void)rd(d->msix_pba + below(16), width());
	if (d->msix_cap) {
		u32 ctl = cfg_rd(d->dev, d->msix_cap + 2, 2);
		cfg_wr(d->dev, d->msix_cap + 2, 2, chance(70) ? (ctl | 0x8000) & ~0x4000u : value());
	}
}

static void pcicfg_fuzz(struct vdev *d)
{
	u32 cap = d->pcicfg_cap;
	if (!cap) return;
	cfg_wr(d->dev, cap + 4, 1, chance(80) ? below(6) : value());
	cfg_wr(d->dev, cap + 8, 4, chance(80) ? below(0x4000) : value());
	cfg_wr(d->dev, cap + 12, 4, chance(80) ? (u32)width() : value());
	u32 at = cap + 16 + below(4);
	int w = width();
	if (chance(50)) (void)cfg_rd(d->dev, at, w); else cfg_wr(d->dev, at, w, value());
}

static const char *kind_name(u16 id)
{
	switch (id - 0x1040) {
	case 1: return "net"; case 2: return "block"; case 3: return "console";
	case 4: return "rng"; case 5: return "balloon"; case 19: return "vsock";
	case 26: return "fs"; case 27: return "pmem"; case 24: return "mem";
	default: return "virtio";
	}
}

static void virtio_scenario(struct vdev *d, int slot)
{
	int blk = d->id == 0x1042;
	vdev_init(d, slot);
	for (u32 r = 0; r < rounds; r++) {
		struct vq *q = nq ? &queues[below((u32)nq)] : 0;
		switch (below(q ? 13 : 4)) {
		case 0: if (d->devcfg) wr(d->devcfg + below(d->devcfg_len + 8), width(), value()); break;
		case 1: if (d->devcfg) (void)rd(d->devcfg + below(d->devcfg_len + 8), width()); break;
		case 2: wr(d->common + below(0x40), width(), value());
			if (chance(30)) vdev_init(d, slot);
			break;
		case 3: (void)rd(d->isr, 1); msix_fuzz(d); pcicfg_fuzz(d); break;
		case 4: case 5: avail_push(q, random_chain(q)); kick(q); settle(q); break;
		case 6: avail_push(q, plausible_chain(q, blk)); kick(q); settle(q); break;
		case 7: {                                       /* avail.idx jumps */
			static const u32 jumps[] = {1, 2, 0x8000, 0xffff};
			u32 j = chance(50) ? (u32)q->size + 1 : jumps[below(4)];
			q->idx = (u16)(q->idx + j);
			wr(VQ_AVAIL(q) + 2, 2, q->idx);
			kick(q); settle(q);
			break;
		}
		case 8: {                                       /* descriptor loops */
			if (!q->size) break;
			u16 a = (u16)below(q->size), b = (u16)below(q->size);
			desc_set(VQ_DESC(q), a, POOL, 64, F_NEXT | F_WRITE, b);
			desc_set(VQ_DESC(q), b, POOL + 0x1000, 64, F_NEXT, a);
			avail_push(q, a); kick(q); settle(q);
			break;
		}
		case 9: indirect_chain(q); kick(q); settle(q); break;
		case 10:                                        /* reset with a request in flight */
			avail_push(q, chance(50) ? plausible_chain(q, blk) : random_chain(q));
			kick(q);
			wr(d->common + 0x14, 1, 0);
			vdev_init(d, slot);
			break;
		case 11:                                        /* notify any queue, any width */
			if (d->notify) wr(d->notify + below(d->notify_mult * 8 + 4) , width(),
					  chance(50) ? below(8) : value());
			break;
		default:                                        /* many buffers at once */
			for (int k = 0; k < 32; k++) avail_push(q, random_chain(q));
			kick(q); settle(q);
		}
	}
	wr(d->common + 0x14, 1, 0);                         /* leave it reset */
	for (int i = 0; i < 1000 && rd(d->common + 0x14, 1); i++) ;
}

/* --- platform scenarios -------------------------------------------------------------- */
static const u16 ports[] = {0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff,
	0x60, 0x64, 0x70, 0x71, 0x80, 0x600, 0x601, 0x604, 0x608, 0x60b,
	0xcf8, 0xcf9, 0xcfa, 0xcfb, 0xcfc, 0xcfd, 0xcfe, 0xcff, 0x402, 0x510, 0x511};

static int overlaps(u16 p, int w, u16 port) { return port >= p && port < p + w; }

static void port_scenario(u32 n)
{
	for (u32 k = 0; k < n; k++) {
		u16 p = chance(75) ? (u16)(ports[below(sizeof ports / 2)] + below(2)) : (u16)rnd();
		int w = width();
		if (chance(50)) {
			switch (w) { case 1: inb(p); break; case 2: inw(p); break; default: inl(p); }
			continue;
		}
		u32 v = value();
		/* the sleep/reset register and the i8042 reset command end the VM on purpose */
		if (overlaps(p, w, SLEEP_PORT)) continue;
		if (overlaps(p, w, I8042_CMD) && ((v >> (8 * (I8042_CMD - p))) & 0xff) == 0xfe) continue;
		if (overlaps(p, w, 0xcf9) && p <= 0xcf9) continue;     /* a reset control register */
		if (p == 0xcf8 && w == 4 && chance(70))
			v = 0x80000000u | (below(32) << 11) | (below(8) << 8) | (below(64) << 2);
		switch (w) { case 1: outb(p, (u8)v); break; case 2: outw(p, (u16)v); break;
			     default: outl(p, v); }
	}
}

static void mmio_scenario(u32 n)
{
	for (u32 k = 0; k < n; k++) {
		u32 a;
		switch (below(4)) {
		case 0: a = ecam + below(1u << 20); break;                  /* any function's config */
		case 1: a = hp + below(4) * 0x1000 + below(0x20); break;   /* GED + hot plug blocks */
		case 2: {
			struct vdev *d = &devs[below((u32)ndevs)];
			int b = (int)below(6);
			if (!d->bar[b]) continue;
			a = d->bar[b] + below(d->bar_size[b] < 0x10000 ? d->bar_size[b] : 0x10000);
			/* MSI-X entries only through msix_fuzz, which never asks for INIT delivery */
			if (d->msix_table && a >= d->msix_table && a < d->msix_table + 16 * d->msix_entries)
				continue;
			break;
		}
		default: a = BAR_WINDOW + below(BAR_WINDOW_END - BAR_WINDOW); break;
		}
		int w = width();
		a &= ~(u32)(w - 1);
		if (chance(50)) (void)rd(a, w); else wr(a, w, value());
	}
}

static void hotplug_scenario(u32 n)
{
	for (u32 k = 0; k < n; k++) {
		u32 blk = hp + (1 + below(3)) * 0x1000;
		u32 off = below(0x18);
		int w = width();
		off &= ~(u32)(w - 1);
		if (chance(40)) (void)rd(blk + off, w);
		else wr(blk + off, w, chance(50) ? value() : 1u << below(32));
	}
	(void)rd(hp, 1);                                          /* GED */
}

void fuzz_main(u32 start_info)
{
	uart_sane();
	const char *cmdline = (const char *)*(volatile u32 *)(start_info + 24);
	parse_cmdline(cmdline);
	rs = seed ? seed : 1;
	for (int i = 0; i < 8; i++) rnd();
	puts("FUZZ-GUEST seed="); putdec(seed); puts(" scenarios="); putdec(scenarios);
	puts(" rounds="); putdec(rounds); puts("\n");

	enumerate();
	for (int i = 0; i < ndevs; i++) {
		puts("FUZZ-PCI dev="); putdec((u32)devs[i].dev); puts(" id="); puthex(devs[i].id);
		puts(" bar0="); puthex(devs[i].bar[0]); puts(" queues="); putdec(devs[i].num_queues);
		puts("\n");
	}
	u32 n = 0;
	for (u32 s = 0; s < scenarios; s++) {
		/* every virtio device once per pass, then ports, MMIO, hot plug blocks */
		u32 nv = 0;
		for (int i = 0; i < ndevs; i++) if (devs[i].common) nv++;
		u32 pick = s % (nv + 3);
		const char *what;
		enumerate();
		if (pick < nv) {
			int i = 0;
			for (u32 seen = 0; i < ndevs; i++)
				if (devs[i].common && seen++ == pick) break;
			what = kind_name(devs[i].id);
			virtio_scenario(&devs[i], i);
		} else if (pick == nv) {
			what = "ports"; port_scenario(rounds * 50);
		} else if (pick == nv + 1) {
			what = "mmio"; mmio_scenario(rounds * 50);
		} else {
			what = "hotplug"; hotplug_scenario(rounds * 20);
		}
		uart_sane();
		puts("\nFUZZ-SCENARIO "); putdec(n++); putc(' '); puts(what);
		puts(" seed="); putdec(seed); puts(" done\n");
		wait_host();
	}
	puts("FUZZ-GUEST-DONE\n");
	outb(SLEEP_PORT, 0x34);
	for (;;) __asm__ volatile("hlt");
}
