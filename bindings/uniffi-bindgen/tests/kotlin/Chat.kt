// Two devices chat through the generated Kotlin binding
// (bindings/generated/kotlin/uniffi/pipit/pipit.kt) on a JVM, against the
// real pipit server binary, which this program starts with a temporary
// data directory: registration, sent, delivered and read receipts both
// ways, a group message, typed errors, and no message seen twice.
//
// Run by ../bindings.rs (kotlin_binding_chats_on_a_jvm), which compiles
// it with kotlinc and sets PIPIT_BIN. Exits non-zero on any failure;
// every wait is bounded by WAIT_MS.

import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.Job
import kotlinx.coroutines.delay
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeoutOrNull
import uniffi.pipit.Client
import uniffi.pipit.Event
import uniffi.pipit.PipitException
import uniffi.pipit.ReceiptKind
import uniffi.pipit.defaultConfig
import uniffi.pipit.startClient
import java.io.File
import java.nio.file.Files
import java.util.concurrent.TimeUnit
import kotlin.system.exitProcess

const val WAIT_MS = 20_000L

class Failure(message: String) : Exception(message)

fun check(ok: Boolean, what: () -> String) {
    if (!ok) throw Failure(what())
}

/** The real server binary on 127.0.0.1, announcing itself on stdout. */
class Server(bin: String, dataDir: File) {
    val proc: Process = ProcessBuilder(bin, "serve", "--listen", "127.0.0.1:0", "--shards", "1", "--data-dir", dataDir.path)
        .redirectError(ProcessBuilder.Redirect.INHERIT)
        .also { it.environment()["PIPIT_LOG"] = "warn" }
        .start()
    val addr: String

    init {
        // "pipit listening on ADDR server key KEY"
        val words = proc.inputStream.bufferedReader().readLine()?.split(" ") ?: emptyList()
        check(words.take(3) == listOf("pipit", "listening", "on")) { "the server did not start: $words" }
        addr = words[3]
    }

    fun stop() {
        proc.destroy()
        if (!proc.waitFor(WAIT_MS, TimeUnit.MILLISECONDS)) proc.destroyForcibly()
    }
}

/** A client and everything it has reported, filled by a pump coroutine. */
class Device(val name: String, val client: Client, scope: CoroutineScope) {
    private val events = mutableListOf<Event>()
    private val pump: Job = scope.launch(Dispatchers.IO) {
        while (true) {
            val e = client.nextEvent() ?: break
            synchronized(events) { events.add(e) }
        }
    }

    fun snapshot(): List<Event> = synchronized(events) { events.toList() }

    inline fun <reified T : Event> of(): List<T> = snapshot().filterIsInstance<T>()

    suspend fun until(what: String, predicate: (Device) -> Boolean) {
        val ok = withTimeoutOrNull(WAIT_MS) {
            while (!predicate(this@Device)) delay(20)
            true
        }
        check(ok == true) { "$name timed out waiting for $what; events so far: ${snapshot().map { it::class.simpleName }}" }
    }

    fun payloads(): List<String> = of<Event.Message>().map { String(it.payload) }

    fun receipts(kind: ReceiptKind): List<Event.Receipt> = of<Event.Receipt>().filter { it.kind == kind }

    suspend fun stop() {
        client.shutdown()
        withTimeoutOrNull(WAIT_MS) { pump.join() }
    }

    companion object {
        suspend fun start(addr: String, dir: File, name: String, scope: CoroutineScope): Device {
            val config = defaultConfig(addr).copy(deviceName = name, connectTimeoutMs = 5000uL)
            return Device(name, startClient(config, dir.path), scope)
        }
    }
}

suspend fun chat(scope: CoroutineScope, bin: String, tmp: File) {
    val server = Server(bin, File(tmp, "server"))
    var alice: Device? = null
    var bob: Device? = null
    try {
        alice = Device.start(server.addr, File(tmp, "alice"), "alice phone", scope)
        bob = Device.start(server.addr, File(tmp, "bob"), "bob phone", scope)
        alice.until("registered") { it.of<Event.Connected>().isNotEmpty() }
        bob.until("registered") { it.of<Event.Connected>().isNotEmpty() }
        val a = alice.of<Event.Connected>()[0].account
        val b = bob.of<Event.Connected>()[0].account
        check(a != b && a > 0uL && b > 0uL) { "accounts $a and $b" }
        println("registered: alice is account $a, bob is account $b")

        // Alice to Bob: sent, delivered, read.
        val first = alice.client.send(b, "hello bob".toByteArray())
        alice.until("sent") { d -> d.of<Event.Sent>().any { it.id == first } }
        val seq = alice.of<Event.Sent>().first { it.id == first }.seq
        bob.until("the message") { "hello bob" in it.payloads() }
        val got = bob.of<Event.Message>().first { String(it.payload) == "hello bob" }
        check(got.fromAccount == a && got.seq == seq) { "bob got $got, alice sent seq $seq" }
        alice.until("delivered") { d -> d.receipts(ReceiptKind.DELIVERED).any { it.through >= seq } }
        bob.client.markRead(a, got.seq)
        alice.until("read") { d -> d.receipts(ReceiptKind.READ).any { it.through >= seq && it.peer == b } }
        println("alice -> bob: sent (seq $seq), delivered, read")

        // Bob answers: the same three, the other way.
        val reply = bob.client.send(a, "hi alice".toByteArray())
        bob.until("reply sent") { d -> d.of<Event.Sent>().any { it.id == reply } }
        val replySeq = bob.of<Event.Sent>().first { it.id == reply }.seq
        alice.until("the reply") { "hi alice" in it.payloads() }
        bob.until("reply delivered") { d -> d.receipts(ReceiptKind.DELIVERED).any { it.through >= replySeq } }
        alice.client.markRead(b, alice.of<Event.Message>().first { String(it.payload) == "hi alice" }.seq)
        bob.until("reply read") { d -> d.receipts(ReceiptKind.READ).any { it.through >= replySeq && it.peer == a } }
        println("bob -> alice: sent (seq $replySeq), delivered, read")

        // A group of two.
        val group = alice.client.createGroup("pals", listOf(b))
        check(group.members.sorted() == listOf(a, b).sorted()) { "members ${group.members}" }
        val groupSend = alice.client.sendGroup(group.group, "hello group".toByteArray())
        alice.until("group sent") { d -> d.of<Event.Sent>().any { it.id == groupSend } }
        bob.until("the group message") { "hello group" in it.payloads() }
        check(bob.of<Event.Message>().first { String(it.payload) == "hello group" }.group == group.group) { "wrong group" }
        println("group ${group.group}: delivered to bob")

        // Typed errors.
        try {
            alice.client.send(b, ByteArray(70_000))
            throw Failure("a 70,000-byte send was accepted")
        } catch (e: PipitException.TooLarge) {
            println("too large: ${e.message}")
        }

        // Encrypted end to end, nothing unreadable, nothing twice.
        check(alice.of<Event.Undecryptable>().isEmpty() && bob.of<Event.Undecryptable>().isEmpty()) { "undecryptable messages" }
        check(bob.payloads() == listOf("hello bob", "hello group")) { "bob saw ${bob.payloads()}" }
        check(alice.payloads() == listOf("hi alice")) { "alice saw ${alice.payloads()}" }
        val stats = alice.client.stats()
        check(stats.sent == 2uL) { "alice's stats: $stats" }
        println("no duplicates; alice's stats: sent ${stats.sent}, reconnects ${stats.reconnects}")
    } finally {
        alice?.stop()
        bob?.stop()
        server.stop()
    }
}

fun main() {
    val bin = System.getenv("PIPIT_BIN") ?: run {
        System.err.println("PIPIT_BIN must name the pipit server binary")
        exitProcess(2)
    }
    val tmp = Files.createTempDirectory("pipit-kotlin").toFile()
    val code = try {
        runBlocking { chat(CoroutineScope(coroutineContext), bin, tmp) }
        println("kotlin chat: PASS")
        0
    } catch (e: Throwable) {
        System.err.println("kotlin chat: FAIL: $e")
        e.printStackTrace()
        1
    } finally {
        tmp.deleteRecursively()
    }
    exitProcess(code)
}
