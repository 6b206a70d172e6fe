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

/* Whether the kernel command line (Linux boot protocol: boot_params.hdr.cmd_line_ptr at
 * offset 0x228 of the zero page) contains the word `w`. */
static int cmdline_has(const u8 *zero_page, const char *w) {
    const char *c = (const char *)(u64)(*(const u32 *)(zero_page + 0x228));
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

void guest_main(const u8 *zero_page) {
    line("hello");
    int cpus = count_cpus();
    puts_serial("boxd-guest: cpus ");
    if (cpus < 0)
        puts_serial("bad-mptable");
    else
        put_dec((u64)cpus);
    puts_serial("\n");
    (void)put_hex;
    if (cmdline_has(zero_page, "wait"))
        tick_forever();
    line("done");
    /* Pulse the reset line through the keyboard controller. */
    outb(0x64, 0xfe);
    for (;;)
        __asm__ volatile("hlt");
}
