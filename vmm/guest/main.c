/* boxd's freestanding test guest. It talks to the VMM only through devices a real guest would
 * use, prints what it finds on the serial console (COM1, 0x3f8) as "boxd-guest: ..." lines
 * that the integration tests read, and ends the VM with an i8042 reset (port 0x64, 0xfe), the
 * way Linux's `reboot` does on a PC. */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void barrier(void) { __asm__ volatile("mfence" ::: "memory"); }

#define COM1 0x3f8

static void putc_serial(char c) {
    /* Wait for the transmit holding register to be empty (LSR bit 5). */
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
        ;
    outb(COM1, (u8)c);
}

static void puts_serial(const char *s) {
    while (*s) {
        if (*s == '\n')
            putc_serial('\r');
        putc_serial(*s++);
    }
}

static void put_hex(u64 v) {
    static const char digits[] = "0123456789abcdef";
    char buf[19];
    buf[0] = '0';
    buf[1] = 'x';
    for (int i = 0; i < 16; i++)
        buf[2 + i] = digits[(v >> (60 - 4 * i)) & 0xf];
    buf[18] = 0;
    puts_serial(buf);
}

static void put_dec(u64 v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts_serial(&buf[i]);
}

static void line(const char *what) {
    puts_serial("boxd-guest: ");
    puts_serial(what);
    puts_serial("\n");
}

/* The MP floating pointer structure ("_MP_") in the BIOS area, and the processor entries of
 * the MP configuration table it points at: how an SMP guest counts its CPUs. */
static int scan_mp(u64 from, u64 to);

static int count_cpus(void) {
    /* Where Linux looks: the first KiB of the EBDA (the last KiB of base memory), then the
     * BIOS ROM area. */
    int n = scan_mp(0x9fc00, 0xa0000);
    return n ? n : scan_mp(0xf0000, 0x100000);
}

static int scan_mp(u64 from, u64 to) {
    for (u64 p = from; p < to; p += 16) {
        const u8 *f = (const u8 *)p;
        if (f[0] != '_' || f[1] != 'M' || f[2] != 'P' || f[3] != '_')
            continue;
        u8 sum = 0;
        for (int i = 0; i < 16; i++)
            sum += f[i];
        if (sum != 0)
            continue;
        const u8 *t = (const u8 *)(u64)(*(const u32 *)(f + 4));
        if (!t || t[0] != 'P' || t[1] != 'C' || t[2] != 'M' || t[3] != 'P')
            return -1;
        u16 len = *(const u16 *)(t + 4);
        u16 entries = *(const u16 *)(t + 34);
        const u8 *e = t + 44;
        int cpus = 0;
        for (u16 i = 0; i < entries && e < t + len; i++) {
            if (e[0] == 0) { /* processor */
                if (e[3] & 1)
                    cpus++;
                e += 20;
            } else {
                e += 8;
            }
        }
        return cpus;
    }
    return 0;
}

/* The kernel command line: from the Linux zero page (boot_params.hdr.cmd_line_ptr at 0x228)
 * or from PVH's hvm_start_info (cmdline_paddr at 24). */
static const u8 *boot_zero_page, *boot_pvh;
static const char *cmdline(void) {
    if (boot_zero_page)
        return (const char *)(u64)(*(const u32 *)(boot_zero_page + 0x228));
    if (boot_pvh)
        return (const char *)(*(const u64 *)(boot_pvh + 24));
    return 0;
}

/* Whether the command line contains the word `w`. */
static int cmdline_has(const char *w) {
    const char *c = cmdline();
    if (!c)
        return 0;
    for (; *c; c++) {
        int i = 0;
        while (w[i] && c[i] == w[i])
            i++;
        if (!w[i] && (c[i] == ' ' || c[i] == 0))
            return 1;
    }
    return 0;
}

/* Stays up, printing a numbered tick now and then, for tests of the VMM's API. */
static void tick_forever(void) {
    for (u64 n = 1;; n++) {
        for (volatile u64 i = 0; i < 20000; i++)
            __asm__ volatile("pause");
        puts_serial("boxd-guest: tick ");
        put_dec(n);
        puts_serial("\n");
    }
}

/* ---- PCI (configuration mechanism #1) ---- */

static u32 pci_read32(u8 dev, u8 reg) {
    outl(0xcf8, 0x80000000u | ((u32)dev << 11) | (reg & 0xfc));
    return inl(0xcfc);
}

static void pci_write32(u8 dev, u8 reg, u32 v) {
    outl(0xcf8, 0x80000000u | ((u32)dev << 11) | (reg & 0xfc));
    outl(0xcfc, v);
}

static u8 pci_read8(u8 dev, u8 reg) { return (u8)(pci_read32(dev, reg) >> ((reg & 3) * 8)); }

/* ---- virtio-pci modern ---- */

struct virtio_pci {
    u8 dev;
    volatile u8 *common, *isr, *devcfg, *notify;
    u32 notify_mult;
};

struct vq_desc { u64 addr; u32 len; u16 flags; u16 next; };
#define QSZ 8
struct vq_avail { u16 flags; u16 idx; u16 ring[QSZ]; u16 used_event; };
struct vq_used_elem { u32 id; u32 len; };
struct vq_used { u16 flags; u16 idx; struct vq_used_elem ring[QSZ]; u16 avail_event; };

/* One split virtqueue of QSZ entries in guest memory. */
struct vq {
    struct vq_desc desc[QSZ] __attribute__((aligned(16)));
    struct vq_avail avail __attribute__((aligned(4)));
    struct vq_used used __attribute__((aligned(4)));
    u16 index, notify_off, seen_used;
};

#define C8(o) (*(volatile u8 *)(vp->common + (o)))
#define C16(o) (*(volatile u16 *)(vp->common + (o)))
#define C32(o) (*(volatile u32 *)(vp->common + (o)))

/* Finds the BAR-0 regions from the vendor capabilities, as a driver must. */
static int virtio_find(struct virtio_pci *vp, u8 dev) {
    vp->dev = dev;
    pci_write32(dev, 0x04, pci_read32(dev, 0x04) | 0x6); /* memory space, bus master */
    u64 bar = pci_read32(dev, 0x10) & ~0xfu;
    if (!(pci_read32(dev, 0x04) & (1u << 20)))
        return -1;
    for (u8 p = pci_read8(dev, 0x34); p; p = pci_read8(dev, p + 1)) {
        if (pci_read8(dev, p) != 0x09)
            continue;
        u8 type = pci_read8(dev, p + 3);
        u32 off = pci_read32(dev, p + 8);
        volatile u8 *at = (volatile u8 *)(bar + off);
        if (type == 1) vp->common = at;
        if (type == 2) { vp->notify = at; vp->notify_mult = pci_read32(dev, p + 16); }
        if (type == 3) vp->isr = at;
        if (type == 4) vp->devcfg = at;
    }
    return (vp->common && vp->notify && vp->isr && vp->devcfg) ? 0 : -2;
}

/* Reset, acknowledge, negotiate (VERSION_1 required). */
static int virtio_begin(struct virtio_pci *vp, u64 want_features) {
    C8(0x14) = 0;
    while (C8(0x14) != 0)
        ;
    C8(0x14) = 1;       /* ACKNOWLEDGE */
    C8(0x14) = 1 | 2;   /* DRIVER */
    C32(0x00) = 0;
    u64 f = C32(0x04);
    C32(0x00) = 1;
    f |= (u64)C32(0x04) << 32;
    if (!(f & (1ul << 32)))
        return -1;
    f &= want_features | (1ul << 32);
    C32(0x08) = 0; C32(0x0c) = (u32)f;
    C32(0x08) = 1; C32(0x0c) = (u32)(f >> 32);
    C8(0x14) = 1 | 2 | 8; /* FEATURES_OK */
    if (!(C8(0x14) & 8))
        return -2;
    return 0;
}

static int virtio_queue(struct virtio_pci *vp, u16 index, struct vq *q) {
    C16(0x16) = index;
    if (C16(0x18) < QSZ)
        return -3;
    C16(0x18) = QSZ;
    C32(0x20) = (u32)(u64)q->desc; C32(0x24) = 0;
    C32(0x28) = (u32)(u64)&q->avail; C32(0x2c) = 0;
    C32(0x30) = (u32)(u64)&q->used; C32(0x34) = 0;
    q->avail.idx = 0;
    q->used.idx = 0;
    q->seen_used = 0;
    q->index = index;
    q->notify_off = C16(0x1e);
    C16(0x1c) = 1;
    return C16(0x1c) == 1 ? 0 : -4;
}

static void virtio_ready(struct virtio_pci *vp) { C8(0x14) = 1 | 2 | 8 | 4; /* DRIVER_OK */ }

/* Makes the chain at descriptor `head` available and rings the doorbell. */
static void virtio_post(struct virtio_pci *vp, struct vq *q, u16 head) {
    u16 idx = q->avail.idx;
    q->avail.ring[idx % QSZ] = head;
    barrier();
    q->avail.idx = idx + 1;
    barrier();
    *(volatile u16 *)(vp->notify + q->notify_off * vp->notify_mult) = q->index;
}

/* Waits for the device to return the next chain; its used length, or -1 after `spins`. */
static long virtio_wait(struct virtio_pci *vp, struct vq *q, u64 spins) {
    for (u64 spin = 0; spin < spins; spin++) {
        barrier();
        if (*(volatile u16 *)&q->used.idx != q->seen_used) {
            u32 len = q->used.ring[q->seen_used % QSZ].len;
            q->seen_used++;
            (void)*vp->isr; /* acknowledge the interrupt */
            return len;
        }
    }
    return -1;
}

/* ---- virtio-blk ---- */

struct blk_hdr { u32 type; u32 reserved; u64 sector; };
static struct blk_hdr blk_req;
static u8 blk_status;
static u8 blk_buf[1024] __attribute__((aligned(512)));
static u8 blk_check[1024] __attribute__((aligned(512)));

static struct vq blk_q;

/* One request: header, optional data buffer (device-writable for reads), status. */
static int blk_do(struct virtio_pci *vp, u32 type, u64 sector, u8 *buf, u32 len, int dev_writes) {
    struct vq_desc *desc_tbl = blk_q.desc;
    blk_req.type = type;
    blk_req.reserved = 0;
    blk_req.sector = sector;
    blk_status = 0xee;
    desc_tbl[0] = (struct vq_desc){(u64)&blk_req, sizeof blk_req, 1, 1};
    if (len) {
        desc_tbl[1] = (struct vq_desc){(u64)buf, len, (u16)(1 | (dev_writes ? 2 : 0)), 2};
        desc_tbl[2] = (struct vq_desc){(u64)&blk_status, 1, 2, 0};
    } else {
        desc_tbl[0].next = 2;
        desc_tbl[2] = (struct vq_desc){(u64)&blk_status, 1, 2, 0};
    }
    virtio_post(vp, &blk_q, 0);
    if (virtio_wait(vp, &blk_q, 1ul << 32) < 0)
        return -100;
    return blk_status;
}

static void blk_test(u8 dev, int n) {
    struct virtio_pci vps = {0}, *vp = &vps;
    puts_serial("boxd-guest: blk");
    put_dec((u64)n);
    if (virtio_find(vp, dev) != 0) {
        puts_serial(" no virtio capabilities\n");
        return;
    }
    int rc = virtio_begin(vp, (1ul << 9) | (1ul << 5)); /* FLUSH, RO */
    if (rc == 0)
        rc = virtio_queue(vp, 0, &blk_q);
    if (rc == 0)
        virtio_ready(vp);
    if (rc != 0) {
        puts_serial(" init failed ");
        put_dec((u64)-rc);
        puts_serial("\n");
        return;
    }
    u64 cap = *(volatile u32 *)vp->devcfg | ((u64)*(volatile u32 *)(vp->devcfg + 4) << 32);
    C32(0x00) = 0;
    int ro = (C32(0x04) >> 5) & 1;
    puts_serial(" capacity ");
    put_dec(cap);
    puts_serial(ro ? " ro" : " rw");

    /* The id string. */
    for (int i = 0; i < 21; i++) blk_buf[i] = 0;
    if (blk_do(vp, 8, 0, blk_buf, 20, 1) == 0) {
        puts_serial(" id ");
        puts_serial((const char *)blk_buf);
    }
    /* Sector 0 as the host wrote it: a text line. */
    if (blk_do(vp, 0, 0, blk_buf, 512, 1) == 0) {
        blk_buf[40] = 0;
        for (int i = 0; i < 40; i++)
            if (blk_buf[i] == '\n') blk_buf[i] = 0;
        puts_serial(" sector0 ");
        puts_serial((const char *)blk_buf);
    } else {
        puts_serial(" read failed");
    }
    puts_serial("\n");

    /* Sectors 2-3: write a pattern, flush, read back, compare. */
    for (int i = 0; i < 1024; i++) blk_buf[i] = (u8)(i * 7 + n + 1);
    int w = blk_do(vp, 1, 2, blk_buf, 1024, 0);
    int f = blk_do(vp, 4, 0, 0, 0, 0);
    for (int i = 0; i < 1024; i++) blk_check[i] = 0;
    int r = blk_do(vp, 0, 2, blk_check, 1024, 1);
    int same = 1;
    for (int i = 0; i < 1024; i++)
        if (blk_check[i] != blk_buf[i]) same = 0;
    puts_serial("boxd-guest: blk");
    put_dec((u64)n);
    puts_serial(" write status ");
    put_dec((u64)w);
    puts_serial(" flush status ");
    put_dec((u64)f);
    puts_serial(" read status ");
    put_dec((u64)r);
    puts_serial(same ? " data same\n" : " data differs\n");

    /* Past the end of the disk: an error status, not a crash. */
    int past = blk_do(vp, 0, cap, blk_check, 512, 1);
    puts_serial("boxd-guest: blk");
    put_dec((u64)n);
    puts_serial(" past-end status ");
    put_dec((u64)past);
    puts_serial("\n");
}

/* ---- virtio-net ---- */

static struct vq net_rx, net_tx;
static u8 rx_frame[2048];
static u8 tx_frame[12 + 64];

static void net_test(u8 dev, int n) {
    struct virtio_pci vps = {0}, *vp = &vps;
    puts_serial("boxd-guest: net");
    put_dec((u64)n);
    int rc = virtio_find(vp, dev);
    if (rc == 0)
        rc = virtio_begin(vp, 1ul << 5); /* MAC */
    if (rc == 0)
        rc = virtio_queue(vp, 0, &net_rx);
    if (rc == 0)
        rc = virtio_queue(vp, 1, &net_tx);
    if (rc != 0) {
        puts_serial(" init failed\n");
        return;
    }
    virtio_ready(vp);
    u8 mac[6];
    for (int i = 0; i < 6; i++)
        mac[i] = vp->devcfg[i];
    puts_serial(" mac ");
    for (int i = 0; i < 6; i++) {
        static const char hx[] = "0123456789abcdef";
        char b[4] = {hx[mac[i] >> 4], hx[mac[i] & 15], i < 5 ? ':' : 0, 0};
        puts_serial(b);
    }
    /* A receive buffer first, then a broadcast frame of the local experimental ethertype. */
    net_rx.desc[0] = (struct vq_desc){(u64)rx_frame, sizeof rx_frame, 2, 0};
    virtio_post(vp, &net_rx, 0);
    for (int i = 0; i < (int)sizeof tx_frame; i++) tx_frame[i] = 0;
    u8 *eth = tx_frame + 12;
    for (int i = 0; i < 6; i++) { eth[i] = 0xff; eth[6 + i] = mac[i]; }
    eth[12] = 0x88; eth[13] = 0xb5;
    const char *msg = "boxd-guest ping";
    for (int i = 0; msg[i]; i++) eth[14 + i] = (u8)msg[i];
    net_tx.desc[0] = (struct vq_desc){(u64)tx_frame, sizeof tx_frame, 0, 0};
    virtio_post(vp, &net_tx, 0);
    long sent = virtio_wait(vp, &net_tx, 1ul << 32);
    puts_serial(sent < 0 ? " send timeout" : " sent");
    /* Other traffic (IPv6 neighbour discovery on a fresh link) may arrive first: skip frames
     * of other ethertypes, handing the buffer back each time. */
    long got = -1;
    for (int tries = 0; tries < 64; tries++) {
        got = virtio_wait(vp, &net_rx, 1ul << 34);
        if (got < 0 || (got >= 12 + 14 && rx_frame[12 + 12] == 0x88 && rx_frame[12 + 13] == 0xb5))
            break;
        got = -1;
        virtio_post(vp, &net_rx, 0);
    }
    if (got < 12 + 14) {
        puts_serial(" no reply\n");
        return;
    }
    u8 *r = rx_frame + 12;
    int to_me = 1;
    for (int i = 0; i < 6; i++)
        if (r[i] != mac[i]) to_me = 0;
    puts_serial(to_me ? " received " : " received (not to me) ");
    char text[49];
    int t = 0;
    for (long i = 12 + 14; i < got && t < 48; i++) {
        u8 c = rx_frame[i];
        if (c < 0x20 || c > 0x7e) break;
        text[t++] = (char)c;
    }
    text[t] = 0;
    puts_serial(text);
    puts_serial("\n");
}

/* ---- virtio-vsock ---- */

struct vsock_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

#define VS_REQUEST 1
#define VS_RESPONSE 2
#define VS_RST 3
#define VS_SHUTDOWN 4
#define VS_RW 5
#define VS_CREDIT_UPDATE 6
#define VS_BUF 4096

static struct vq vs_rx, vs_tx;
static u8 vs_rx_buf[4][sizeof(struct vsock_hdr) + 1024];
static u8 vs_tx_buf[sizeof(struct vsock_hdr) + 256];
static u64 vs_cid;
static u32 vs_fwd_cnt;

static void vs_post_rx(struct virtio_pci *vp, u16 i) {
    vs_rx.desc[i] = (struct vq_desc){(u64)vs_rx_buf[i], sizeof vs_rx_buf[i], 2, 0};
    virtio_post(vp, &vs_rx, i);
}

static int vs_send(struct virtio_pci *vp, u32 src_port, u32 dst_port, u16 op, const char *data) {
    struct vsock_hdr *h = (struct vsock_hdr *)vs_tx_buf;
    u32 len = 0;
    if (data)
        while (data[len] && len < 256) { vs_tx_buf[sizeof *h + len] = (u8)data[len]; len++; }
    *h = (struct vsock_hdr){vs_cid, 2, src_port, dst_port, len, 1, op, 0, VS_BUF, vs_fwd_cnt};
    vs_tx.desc[0] = (struct vq_desc){(u64)vs_tx_buf, (u32)(sizeof *h + len), 0, 0};
    virtio_post(vp, &vs_tx, 0);
    return virtio_wait(vp, &vs_tx, 1ul << 32) < 0 ? -1 : 0;
}

/* Waits for a packet other than a credit update; copies its data into `text` (NUL-ended) and
 * returns its header, or 0 on timeout. The buffer goes back to the device. */
static struct vsock_hdr vs_last;
static struct vsock_hdr *vs_recv(struct virtio_pci *vp, char *text, int max) {
    for (int tries = 0; tries < 64; tries++) {
        if (virtio_wait(vp, &vs_rx, 1ul << 34) < 0)
            return 0;
        u16 slot = (u16)(vs_rx.used.ring[(u16)(vs_rx.seen_used - 1) % QSZ].id % 4);
        struct vsock_hdr *h = (struct vsock_hdr *)vs_rx_buf[slot];
        vs_last = *h;
        int n = 0;
        if (h->op == VS_RW) {
            for (u32 i = 0; i < h->len && n < max - 1; i++) {
                u8 c = vs_rx_buf[slot][sizeof *h + i];
                if (c >= 0x20 && c <= 0x7e) text[n++] = (char)c;
            }
            vs_fwd_cnt += h->len;
        }
        text[n] = 0;
        vs_post_rx(vp, slot);
        if (vs_last.op != VS_CREDIT_UPDATE)
            return &vs_last;
    }
    return 0;
}

static void vsock_test(u8 dev, u64 port) {
    struct virtio_pci vps = {0}, *vp = &vps;
    char text[128];
    int rc = virtio_find(vp, dev);
    if (rc == 0)
        rc = virtio_begin(vp, 0);
    if (rc == 0)
        rc = virtio_queue(vp, 0, &vs_rx);
    if (rc == 0)
        rc = virtio_queue(vp, 1, &vs_tx);
    if (rc != 0) {
        puts_serial("boxd-guest: vsock init failed\n");
        return;
    }
    virtio_ready(vp);
    vs_cid = *(volatile u32 *)vp->devcfg | ((u64)*(volatile u32 *)(vp->devcfg + 4) << 32);
    for (u16 i = 0; i < 4; i++)
        vs_post_rx(vp, i);

    /* Guest to host: connect to host port `port`, send a line, print the answer. */
    puts_serial("boxd-guest: vsock cid ");
    put_dec(vs_cid);
    vs_fwd_cnt = 0;
    vs_send(vp, 1234, (u32)port, VS_REQUEST, 0);
    struct vsock_hdr *h = vs_recv(vp, text, sizeof text);
    if (!h || h->op != VS_RESPONSE) {
        puts_serial(" connect refused\n");
        return;
    }
    puts_serial(" connected to port ");
    put_dec(port);
    vs_send(vp, 1234, (u32)port, VS_RW, "hello from the guest\n");
    h = vs_recv(vp, text, sizeof text);
    puts_serial(h && h->op == VS_RW ? " received " : " no data");
    puts_serial(text);
    puts_serial("\n");
    vs_send(vp, 1234, (u32)port, VS_SHUTDOWN, 0);

    /* Host to guest: accept one connection (the host wrote CONNECT <port+1>), echo a line. */
    vs_fwd_cnt = 0;
    h = vs_recv(vp, text, sizeof text);
    while (h && h->op != VS_REQUEST)
        h = vs_recv(vp, text, sizeof text);
    if (!h) {
        puts_serial("boxd-guest: vsock no incoming connection\n");
        return;
    }
    u32 peer = h->src_port, mine = h->dst_port;
    vs_send(vp, mine, peer, VS_RESPONSE, 0);
    h = vs_recv(vp, text, sizeof text);
    if (!h || h->op != VS_RW) {
        puts_serial("boxd-guest: vsock accepted but no data\n");
        return;
    }
    puts_serial("boxd-guest: vsock accepted on port ");
    put_dec(mine);
    puts_serial(" received ");
    puts_serial(text);
    puts_serial("\n");
    char echo[160] = "echo: ";
    int e = 6;
    for (int i = 0; text[i] && e < 150; i++) echo[e++] = text[i];
    echo[e++] = '\n';
    echo[e] = 0;
    vs_send(vp, mine, peer, VS_RW, echo);
    /* Wait for the host to close: a SHUTDOWN or RST ends it. */
    h = vs_recv(vp, text, sizeof text);
    puts_serial(h && (h->op == VS_SHUTDOWN || h->op == VS_RST) ? "boxd-guest: vsock host closed\n"
                                                                 : "boxd-guest: vsock no close\n");
    vs_send(vp, mine, peer, VS_RST, 0);
}

/* The number after `word=` on the command line, or `dflt`. */
static u64 cmdline_num(const char *word, u64 dflt) {
    const char *c = cmdline();
    if (!c)
        return dflt;
    for (; *c; c++) {
        int i = 0;
        while (word[i] && c[i] == word[i])
            i++;
        if (!word[i] && c[i] == '=') {
            u64 v = 0;
            for (c += i + 1; *c >= '0' && *c <= '9'; c++)
                v = v * 10 + (u64)(*c - '0');
            return v;
        }
    }
    return dflt;
}

static void pci_scan(void) {
    int blk = 0, net = 0;
    for (u8 dev = 0; dev < 32; dev++) {
        u32 id = pci_read32(dev, 0);
        if ((id & 0xffff) == 0xffff)
            continue;
        puts_serial("boxd-guest: pci 00:");
        put_dec(dev);
        puts_serial(" ");
        put_hex(id);
        puts_serial("\n");
        if (id == 0x10421af4)
            blk_test(dev, blk++);
        if (id == 0x10411af4)
            net_test(dev, net++);
        if (id == 0x10531af4)
            vsock_test(dev, cmdline_num("vsock_port", 5000));
    }
}

void guest_main(const u8 *zero_page, const u8 *pvh_start_info) {
    boot_zero_page = zero_page;
    boot_pvh = pvh_start_info;
    line("hello");
    int cpus = count_cpus();
    puts_serial("boxd-guest: cpus ");
    if (cpus < 0)
        puts_serial("bad-mptable");
    else
        put_dec((u64)cpus);
    puts_serial("\n");
    pci_scan();
    if (cmdline_has("wait"))
        tick_forever();
    line("done");
    /* Pulse the reset line through the keyboard controller. */
    outb(0x64, 0xfe);
    for (;;)
        __asm__ volatile("hlt");
}
